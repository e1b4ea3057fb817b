//! `imagegen dlq list` and `imagegen dlq replay`, and poison messages ending in the dead-letter
//! queue through the broker's delivery limit.

use std::process::Stdio;
use std::time::{Duration, Instant};

use imagegen::domain::event::Status;
use imagegen_fakes::openai::{Fault, Rule};
use serde_json::{Value, json};

use crate::helpers::{Store, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

pub fn dlq_list(env: &TestEnv) -> Vec<Value> {
    let out = env
        .command()
        .args(["dlq", "list", "--json"])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

pub fn dlq_replay(env: &TestEnv, args: &[&str]) -> Value {
    let out = env
        .command()
        .args(["dlq", "replay"])
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn dead_letters_are_listed_with_their_reason_and_replayed_on_demand() {
    let env = TestEnv::new(Store::Fs).await;
    env.fake().push_rule(Rule {
        prompt_contains: Some("refused once".into()),
        fault: Fault::Moderation,
        times: Some(1),
    });
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    env.publish(json!({"id": "refused", "batch": "b", "prompt": "refused once"}))
        .await;
    env.publish(json!({"id": "typo", "batch": "b", "prompt": "p", "sise": "1x1"}))
        .await;
    env.events(&mut listener, 2, WAIT).await;
    env.wait_dead_letters(2, WAIT).await;
    worker.shutdown().await.unwrap();

    let mut listed = dlq_list(&env);
    listed.sort_by_key(|l| l["job_id"].as_str().unwrap().to_string());
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["job_id"], "refused");
    assert_eq!(listed[0]["reason"], "content_policy");
    assert_eq!(listed[0]["attempts"], 1);
    assert_eq!(listed[1]["job_id"], "typo");
    assert_eq!(listed[1]["reason"], "invalid_job");
    assert!(listed[1]["message"].as_str().unwrap().contains("sise"));
    // Listing leaves them where they are (returned when the listing's channel closes).
    env.wait_dead_letters(2, WAIT).await;
    assert_eq!(env.ready(&env.settings.amqp.dead_letter_queue).await, 2);

    // Replay skips invalid jobs unless asked.
    let report = dlq_replay(&env, &[]);
    assert_eq!(
        (report["replayed"].as_u64(), report["skipped"].as_u64()),
        (Some(1), Some(1))
    );
    // The skipped one is back in the dead-letter queue (the broker requeues it asynchronously).
    env.wait_dead_letters(1, WAIT).await;
    assert_eq!(env.ready(&env.settings.amqp.dead_letter_queue).await, 1);
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 1);
    let worker = env.start_worker().await;
    let event = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(event.data.job_id, "refused");
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "the refusal rule is used up"
    );
    assert_eq!(
        event.data.attempts, 1,
        "a replayed job starts with a fresh attempt count"
    );

    let report = dlq_replay(&env, &["--include-invalid"]);
    assert_eq!(report["replayed"].as_u64(), Some(1));
    let again = env.events(&mut listener, 1, WAIT).await.remove(0);
    assert_eq!(again.data.job_id, "typo");
    assert_eq!(again.data.status, Status::Failed);
    env.wait_dead_letters(1, WAIT).await;
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_poison_message_that_kills_its_worker_ends_in_the_dead_letter_queue() {
    let env = TestEnv::with(Store::Fs, &[("amqp.delivery_limit", "2".into())]).await;
    // The job hangs its worker, which is killed each time (as an OOM kill or a crash would).
    env.fake().push_rule(Rule {
        prompt_contains: Some("poison".into()),
        fault: Fault::Hang { secs: 60.0 },
        times: None,
    });
    let data = tempfile::tempdir().unwrap();
    env.publish(json!({"id": "poison", "prompt": "a poison job"}))
        .await;
    let deadline = Instant::now() + Duration::from_secs(90);
    let mut kills = 0;
    while env.ready(&env.settings.amqp.dead_letter_queue).await == 0 {
        assert!(
            Instant::now() < deadline,
            "never dead-lettered after {kills} kills"
        );
        let calls = env.fake().calls_for("poison");
        let mut worker = env
            .command()
            .env("IMAGEGEN__STORAGE__ROOT", data.path())
            .arg("worker")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        // Kill it once it holds the job, or after a while if the broker already let the job go.
        let wait_until = Instant::now() + Duration::from_secs(5);
        while env.fake().calls_for("poison") == calls && Instant::now() < wait_until {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        worker.kill().unwrap();
        worker.wait().unwrap();
        kills += 1;
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(kills >= 2, "{kills}");
    let listed = dlq_list(&env);
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["job_id"], "poison");
    // Either the broker's delivery limit ended it (Garage-like stores, no leases), or the job's
    // lease showed that workers kept dying on it (stores with conditional writes, like fs here).
    let reason = listed[0]["reason"].as_str().unwrap();
    match reason {
        "delivery_limit" | "rejected" => {
            assert_eq!(listed[0]["broker_reason"].as_str(), Some(reason))
        }
        "retries_exhausted" => assert!(listed[0]["message"].as_str().unwrap().contains("poison")),
        other => panic!("unexpected reason {other}"),
    }
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_whose_headers_nearly_fill_a_frame_is_dead_lettered_once_with_one_event() {
    // Small frames (a broker configured so), where the worker's own headers make the difference.
    let env = TestEnv::with(Store::Fs, &[("amqp.frame_max", "16384".into())]).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    // 15.8 KB of the producer's headers fit the worker's 16 KiB frames; with the worker's own
    // error headers beside them (a message of 1000 characters), they would not.
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-trace".into(),
        lapin::types::AMQPValue::LongString("t".repeat(15_800).into()),
    );
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    // Invalid (an unknown field with a long name): dead-lettered with a long message.
    let body = format!(r#"{{"id":"heavy","prompt":"p","{}":1}}"#, "f".repeat(1200));
    env.publish_with(body.as_bytes(), props).await;
    let events = env.events(&mut listener, 1, WAIT).await;
    assert_eq!(events[0].data.status, Status::Failed);
    env.wait_dead_letters(1, WAIT).await;
    // No redelivery publishes the failure again.
    let more =
        tokio::time::timeout(Duration::from_secs(3), env.events(&mut listener, 1, WAIT)).await;
    assert!(more.is_err(), "a second event: {more:?}");
    let dead = env.drain_dead_letters().await;
    assert_eq!(dead.len(), 1);
    let headers = dead[0].1.headers().clone().unwrap();
    let h = headers.inner();
    assert!(
        h.get("x-trace").is_none(),
        "the producer's headers were left off"
    );
    assert_eq!(
        h.get("x-imagegen-headers-dropped"),
        Some(&lapin::types::AMQPValue::LongUInt(1))
    );
    assert_eq!(
        h.get("x-imagegen-error-kind"),
        Some(&lapin::types::AMQPValue::LongString("invalid_job".into()))
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

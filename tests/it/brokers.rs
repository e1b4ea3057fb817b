//! Several broker addresses (`amqp.url` with the nodes of a cluster, separated by commas): an
//! address that refuses connections is passed over for the next; a start-up where every address
//! refuses the worker for a reason retrying cannot fix fails, saying why for each; an event the
//! broker does not confirm is published again, from the stored result, without buying again.

use std::time::Duration;

use imagegen::domain::event::Status;
use serde_json::json;

use crate::helpers::{Store, TestEnv, amqp_url};

#[tokio::test]
async fn an_address_that_refuses_connections_is_passed_over() {
    let env = TestEnv::new(Store::Fs).await;
    let mut settings = env.settings.clone();
    // Nothing listens on port 1: connections there are refused at once.
    settings.amqp.url = format!("amqp://guest:guest@127.0.0.1:1/%2f, {}", amqp_url()).into();
    let mut listener = env.listen().await;
    let worker = env.start_worker_with(settings).await;
    env.publish(json!({"id": "n1", "prompt": "a node apart"}))
        .await;
    let event = env
        .events(&mut listener, 1, Duration::from_secs(60))
        .await
        .remove(0);
    assert_eq!(
        event.data.status,
        Status::Succeeded,
        "{:?}",
        event.data.error
    );
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn every_address_refusing_the_worker_fails_the_start_and_says_why() {
    let env = TestEnv::new(Store::Fs).await;
    let real = amqp_url();
    let (scheme, rest) = real.split_once("://").unwrap();
    let host = rest.rsplit_once('@').map_or(rest, |(_, h)| h);
    let host = host.split('/').next().unwrap();
    let urls =
        format!("{scheme}://guest:wrong-password@{host}/%2f,{scheme}://nobody:nothing@{host}/%2f");
    let out = env
        .command()
        .env("IMAGEGEN__AMQP__URL", &urls)
        .env("IMAGEGEN__STORAGE__KIND", "fs")
        .env(
            "IMAGEGEN__STORAGE__ROOT",
            tempfile::tempdir().unwrap().path(),
        )
        .env("IMAGEGEN__HTTP__LISTEN", "")
        .arg("worker")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(stderr.contains("no broker address answered"), "{stderr}");
    assert!(
        stderr.contains("guest:****@") && stderr.contains("nobody:****@"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("wrong-password"),
        "the password is never shown: {stderr}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_event_the_broker_does_not_confirm_is_published_again_without_buying_again() {
    let env = TestEnv::new(Store::S3).await;
    // The results exchange is gone: the broker refuses every event (a channel error, where a
    // node's loss would leave the publish unconfirmed), so no job's message is acked.
    let channel = env.connection.create_channel().await.unwrap();
    channel
        .exchange_delete(
            env.settings.amqp.results_exchange.as_str().into(),
            lapin::options::ExchangeDeleteOptions::default(),
        )
        .await
        .unwrap();
    let mut settings = env.settings.clone();
    settings.amqp.declare_topology = false;
    let worker = env.start_worker_with(settings).await;
    let jobs = 5;
    env.publish_many(
        (0..jobs).map(|i| json!({"id": format!("u{i}"), "prompt": format!("an unconfirmed {i}")})),
    )
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while env.fake().billed_for("an unconfirmed") < jobs {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the jobs were not bought"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Refused again and again: their messages come back to the queue each time.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(env.ready(&env.settings.amqp.results_queue).await, 0);
    imagegen::amqp::topology::declare(&env.connection, &env.settings)
        .await
        .unwrap();
    let events = env.take_results_queue(jobs as usize).await;
    let mut ids: Vec<_> = events.iter().map(|e| e.data.job_id.clone()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), jobs as usize, "each job's event, once confirmed");
    assert!(events.iter().all(|e| e.data.status == Status::Succeeded));
    // Published again from the stored result: nothing was bought twice.
    assert_eq!(env.fake().billed_for("an unconfirmed"), jobs);
    worker.shutdown().await.unwrap();
    assert_eq!(
        env.ready(&env.settings.amqp.jobs_queue).await,
        0,
        "every job settled"
    );
    env.cleanup().await;
}

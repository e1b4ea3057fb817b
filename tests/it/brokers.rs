//! Several broker addresses (`amqp.url` with the nodes of a cluster, separated by commas): an
//! address that refuses connections is passed over for the next; a start-up where every address
//! refuses the worker for a reason retrying cannot fix fails, saying why for each.

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

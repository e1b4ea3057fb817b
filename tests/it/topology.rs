//! Topology: create what is missing, accept what exists; confirmed, mandatory publishing.

use std::sync::Arc;

use imagegen::amqp::publisher::Publisher;
use imagegen::amqp::{connect, topology};
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, ExchangeKind};
use serde_json::json;

use crate::helpers::{Store, TestEnv};

#[tokio::test]
async fn declaring_twice_is_harmless_and_existing_queues_are_accepted_as_they_are() {
    let env = TestEnv::new(Store::Fs).await;
    // Declared once by TestEnv; again here.
    topology::declare(&env.connection, &env.settings)
        .await
        .unwrap();

    // An operator created the jobs queue of another deployment with other arguments (classic,
    // a max length): the worker's declare must accept it, not fail with 406.
    let mut settings = env.settings.clone();
    settings.amqp.jobs_queue = format!("it.{}.operator-jobs", env.id);
    let channel = env.connection.create_channel().await.unwrap();
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString(LongString::from("classic")),
    );
    args.insert("x-max-length".into(), AMQPValue::LongInt(1000));
    channel
        .queue_declare(
            settings.amqp.jobs_queue.as_str().into(),
            QueueDeclareOptions::durable(),
            args,
        )
        .await
        .unwrap();
    topology::declare(&env.connection, &settings)
        .await
        .expect("existing queue accepted");
    for q in [
        settings.amqp.jobs_queue.clone(),
        settings.delay_queue_name(1),
        settings.delay_queue_name(3),
    ] {
        let channel = env.connection.create_channel().await.unwrap();
        let _ = channel
            .queue_delete(q.as_str().into(), Default::default())
            .await;
    }
    env.cleanup().await;
}

#[tokio::test]
async fn with_topology_declaration_off_a_missing_queue_is_a_clear_error() {
    let env = TestEnv::new(Store::Fs).await;
    let mut settings = env.settings.clone();
    settings.amqp.declare_topology = false;
    settings.amqp.jobs_queue = format!("it.{}.missing", env.id);
    let worker = env.start_worker_with(settings).await;
    let result = worker.task.await.unwrap();
    let message = format!("{:#}", result.expect_err("no queue, no worker"));
    assert!(
        message.contains("NOT_FOUND") || message.contains("404"),
        "{message}"
    );
    env.cleanup().await;
}

#[tokio::test]
async fn an_unroutable_publish_is_an_error_not_a_success() {
    let env = TestEnv::new(Store::Fs).await;
    let exchange = format!("it.{}.nowhere", env.id);
    let channel = env.connection.create_channel().await.unwrap();
    channel
        .exchange_declare(
            exchange.as_str().into(),
            ExchangeKind::Topic,
            ExchangeDeclareOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let publisher = Publisher::new(Arc::new(connect(&env.settings, "test").await.unwrap()));
    let body = serde_json::to_vec(&json!({"x": 1})).unwrap();
    let err = publisher
        .publish(
            &exchange,
            "job.succeeded",
            &body,
            BasicProperties::default(),
        )
        .await
        .expect_err("no queue is bound");
    assert!(
        err.to_string().contains("NO_ROUTE") || err.to_string().contains("312"),
        "{err}"
    );
    // The publisher's channel survives a returned message: the next publish works.
    publisher
        .publish(
            "",
            &env.settings.amqp.jobs_queue,
            &body,
            BasicProperties::default(),
        )
        .await
        .expect("publishing goes on");
    let _ = channel
        .exchange_delete(exchange.as_str().into(), Default::default())
        .await;
    env.cleanup().await;
}

#[tokio::test]
async fn frames_are_the_brokers_and_larger_messages_still_go_through() {
    let env = TestEnv::new(Store::Fs).await;
    // amqp.frame_max is offered and accepted: RabbitMQ's own 128 KiB.
    assert_eq!(env.settings.amqp.frame_max, 131_072);
    assert_eq!(env.connection.configuration().frame_max(), 131_072);
    // A frame_max in the URL wins.
    let mut settings = env.settings.clone();
    settings.amqp.url = format!("{}?frame_max=8192", crate::helpers::amqp_url()).into();
    let small = connect(&settings, "test-small-frames").await.unwrap();
    assert_eq!(small.configuration().frame_max(), 8192);
    let _ = small.close(200, "done".into()).await;

    // A job of about 45 KB (a long prompt, large metadata) spans several frames, and so does its
    // event, which carries the metadata back.
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let prompt = "a lighthouse on a cliff at dusk, ".repeat(900);
    let note = "n".repeat(15_000);
    env.publish(json!({"id": "big", "prompt": prompt, "metadata": {"note": note}}))
        .await;
    let events = env
        .events(&mut listener, 1, std::time::Duration::from_secs(30))
        .await;
    assert_eq!(events[0].data.job_id, "big");
    assert_eq!(
        events[0].data.status,
        imagegen::domain::event::Status::Succeeded
    );
    assert_eq!(
        events[0].data.metadata.to_value()["note"].as_str(),
        Some(note.as_str())
    );
    assert_eq!(env.fake().stats().requests, 1);
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

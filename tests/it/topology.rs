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

//! Messages no well-behaved client library would send, published as raw AMQP 0-9-1 frames:
//! properties whose short strings are not UTF-8. The broker passes them through; the worker must
//! process them like any job, without losing its connection (and every message in flight on it).

use std::time::Duration;

use imagegen::domain::event::Status;
use serde_json::json;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::helpers::{Store, TestEnv};

const WAIT: Duration = Duration::from_secs(30);

/// A minimal AMQP 0-9-1 publisher: enough frames to publish one message and close.
struct RawPublisher {
    socket: TcpStream,
}

/// The AMQP type of a content property, written by hand.
enum Property<'a> {
    ContentType(&'a [u8]),
    Headers(Vec<(&'a [u8], &'a [u8])>),
    CorrelationId(&'a [u8]),
    MessageId(&'a [u8]),
}

fn short(bytes: &[u8]) -> Vec<u8> {
    let mut out = vec![bytes.len() as u8];
    out.extend_from_slice(bytes);
    out
}

fn long(bytes: &[u8]) -> Vec<u8> {
    let mut out = (bytes.len() as u32).to_be_bytes().to_vec();
    out.extend_from_slice(bytes);
    out
}

fn method(class: u16, method: u16, args: &[u8]) -> Vec<u8> {
    let mut out = class.to_be_bytes().to_vec();
    out.extend_from_slice(&method.to_be_bytes());
    out.extend_from_slice(args);
    out
}

impl RawPublisher {
    async fn connect() -> Self {
        let mut socket = TcpStream::connect("127.0.0.1:5672").await.unwrap();
        socket.write_all(b"AMQP\x00\x00\x09\x01").await.unwrap();
        let mut p = Self { socket };
        p.expect(0, 10, 10).await; // Connection.Start
        let mut start_ok = long(&[]); // no client properties (an empty table)
        start_ok.extend(short(b"PLAIN"));
        start_ok.extend(long(b"\0guest\0guest"));
        start_ok.extend(short(b"en_US"));
        p.send(1, 0, &method(10, 11, &start_ok)).await;
        let tune = p.expect(0, 10, 30).await; // Connection.Tune
        let mut tune_ok = tune[4..10].to_vec(); // the server's channel_max and frame_max
        tune_ok.extend_from_slice(&0u16.to_be_bytes()); // no heartbeat
        p.send(1, 0, &method(10, 31, &tune_ok)).await;
        let mut open = short(b"/");
        open.extend(short(b""));
        open.push(0);
        p.send(1, 0, &method(10, 40, &open)).await;
        p.expect(0, 10, 41).await; // Connection.Open-Ok
        p.send(1, 1, &method(20, 10, &short(b""))).await;
        p.expect(1, 20, 11).await; // Channel.Open-Ok
        p
    }

    async fn send(&mut self, kind: u8, channel: u16, payload: &[u8]) {
        let mut frame = vec![kind];
        frame.extend_from_slice(&channel.to_be_bytes());
        frame.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        frame.extend_from_slice(payload);
        frame.push(0xCE);
        self.socket.write_all(&frame).await.unwrap();
    }

    /// Reads frames until the method `class.method` on `channel`; returns its payload.
    async fn expect(&mut self, channel: u16, class: u16, id: u16) -> Vec<u8> {
        loop {
            let mut head = [0u8; 7];
            self.socket.read_exact(&mut head).await.unwrap();
            let size = u32::from_be_bytes([head[3], head[4], head[5], head[6]]) as usize;
            let mut payload = vec![0u8; size + 1];
            self.socket.read_exact(&mut payload).await.unwrap();
            payload.pop();
            let on = u16::from_be_bytes([head[1], head[2]]);
            if head[0] == 1 && on == channel && payload[..4] == method(class, id, &[])[..] {
                return payload;
            }
            assert!(
                !(head[0] == 1 && payload[..4] == method(10, 50, &[])[..]),
                "the broker closed the connection: {:?}",
                String::from_utf8_lossy(&payload)
            );
        }
    }

    /// Publishes `body` to `queue` with `properties`, then closes: once the broker confirmed the
    /// channel's close, the message is in the queue.
    async fn publish(mut self, queue: &str, body: &[u8], properties: &[Property<'_>]) {
        let mut publish = 0u16.to_be_bytes().to_vec();
        publish.extend(short(b""));
        publish.extend(short(queue.as_bytes()));
        publish.push(0);
        self.send(1, 1, &method(60, 40, &publish)).await;
        // Each property with its flag bit; the list goes in the order of the bits, highest first.
        let mut encoded: Vec<(u8, Vec<u8>)> = properties
            .iter()
            .map(|property| match property {
                Property::ContentType(v) => (15, short(v)),
                Property::Headers(fields) => {
                    let mut table = Vec::new();
                    for (name, value) in fields {
                        table.extend(short(name));
                        table.push(b'S');
                        table.extend(long(value));
                    }
                    (13, long(&table))
                }
                Property::CorrelationId(v) => (10, short(v)),
                Property::MessageId(v) => (7, short(v)),
            })
            .collect();
        encoded.sort_by_key(|(bit, _)| std::cmp::Reverse(*bit));
        let flags = encoded.iter().fold(0u16, |f, (bit, _)| f | 1 << bit);
        let list: Vec<u8> = encoded.into_iter().flat_map(|(_, bytes)| bytes).collect();
        let mut header = 60u16.to_be_bytes().to_vec();
        header.extend_from_slice(&0u16.to_be_bytes());
        header.extend_from_slice(&(body.len() as u64).to_be_bytes());
        header.extend_from_slice(&flags.to_be_bytes());
        header.extend(list);
        self.send(2, 1, &header).await;
        self.send(3, 1, body).await;
        let mut close = 200u16.to_be_bytes().to_vec();
        close.extend(short(b"ok"));
        close.extend_from_slice(&[0, 0, 0, 0]);
        self.send(1, 1, &method(20, 40, &close)).await;
        self.expect(1, 20, 41).await; // Channel.Close-Ok
        self.send(1, 0, &method(10, 50, &close)).await;
        self.expect(0, 10, 51).await; // Connection.Close-Ok
    }
}

#[tokio::test]
async fn properties_that_are_not_utf8_cost_no_connection_and_no_job() {
    let env = TestEnv::new(Store::Fs).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    let queue = env.settings.amqp.jobs_queue.clone();
    let job = |id: &str| serde_json::to_vec(&json!({"id": id, "prompt": "a lighthouse"})).unwrap();
    RawPublisher::connect()
        .await
        .publish(
            &queue,
            &job("bad-message-id"),
            &[
                Property::MessageId(b"m-\xff\xfe"),
                Property::CorrelationId(b"c-\xc3"),
            ],
        )
        .await;
    RawPublisher::connect()
        .await
        .publish(
            &queue,
            &job("bad-content-type"),
            &[Property::ContentType(b"application/\xffjson")],
        )
        .await;
    RawPublisher::connect()
        .await
        .publish(
            &queue,
            &job("bad-header-name"),
            &[Property::Headers(vec![(b"x-\xff\xfe", b"v")])],
        )
        .await;
    // 255 invalid bytes: three times as long once each is U+FFFD, longer than a short string
    // may be (the fuzz target amqp_headers found that this panicked the client's parser).
    RawPublisher::connect()
        .await
        .publish(
            &queue,
            &job("long-bad-header-name"),
            &[
                Property::MessageId(&[0xff; 255]),
                Property::Headers(vec![(&[0xfe; 255], b"v")]),
            ],
        )
        .await;
    // And jobs from a well-behaved client around them.
    env.publish(json!({"id": "plain-1", "prompt": "a fox"}))
        .await;
    env.publish(json!({"id": "plain-2", "prompt": "a whale"}))
        .await;
    let mut events = env.events(&mut listener, 6, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    let ids: Vec<&str> = events.iter().map(|e| e.data.job_id.as_str()).collect();
    assert_eq!(
        ids,
        [
            "bad-content-type",
            "bad-header-name",
            "bad-message-id",
            "long-bad-header-name",
            "plain-1",
            "plain-2"
        ]
    );
    for event in &events {
        assert_eq!(
            event.data.status,
            Status::Succeeded,
            "{}",
            event.data.job_id
        );
        assert_eq!(event.data.attempts, 1, "{}", event.data.job_id);
    }
    // The invalid bytes are shown as U+FFFD, the rest as sent.
    assert_eq!(
        events[2].data.message_id.as_deref(),
        Some("m-\u{fffd}\u{fffd}")
    );
    assert_eq!(events[2].data.correlation_id.as_deref(), Some("c-\u{fffd}"));
    let long = events[3].data.message_id.as_deref().unwrap_or_default();
    assert_eq!(
        long,
        "\u{fffd}".repeat(85),
        "cut to a short string's 255 bytes"
    );
    assert_eq!(env.fake().stats().requests, 6, "each job bought once");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn a_job_with_headers_larger_than_small_frames_is_processed_like_any_other() {
    let env = TestEnv::new(Store::Fs).await;
    let mut listener = env.listen().await;
    let worker = env.start_worker().await;
    // 100 KB of headers: one content header frame, which a 16 KiB frame could not carry.
    let mut headers = lapin::types::FieldTable::default();
    headers.insert(
        "x-trace".into(),
        lapin::types::AMQPValue::LongString("t".repeat(100_000).into()),
    );
    let props = lapin::BasicProperties::default()
        .with_content_type("application/json".into())
        .with_headers(headers);
    env.publish_with(br#"{"id":"wide","prompt":"a lighthouse"}"#, props)
        .await;
    env.publish(json!({"id": "plain", "prompt": "a fox"})).await;
    let mut events = env.events(&mut listener, 2, WAIT).await;
    events.sort_by(|a, b| a.data.job_id.cmp(&b.data.job_id));
    assert_eq!(events[0].data.job_id, "plain");
    assert_eq!(events[1].data.job_id, "wide");
    for event in &events {
        assert_eq!(event.data.status, Status::Succeeded);
        assert_eq!(event.data.attempts, 1);
    }
    assert_eq!(env.fake().stats().requests, 2, "each job bought once");
    worker.shutdown().await.unwrap();
    env.cleanup().await;
}

#[tokio::test]
async fn dlq_list_and_replay_read_every_hostile_dead_letter_and_show_it_escaped() {
    let env = TestEnv::new(Store::Fs).await;
    let dead = env.settings.amqp.dead_letter_queue.clone();
    // A message_id that is not UTF-8 and one that would clear a terminal, bodies that are not
    // jobs: nothing a listing may stop at.
    RawPublisher::connect()
        .await
        .publish(&dead, b"\xff not json", &[Property::MessageId(b"m-\xff")])
        .await;
    RawPublisher::connect()
        .await
        .publish(
            &dead,
            br#"{"prompt":"p"}"#,
            &[Property::MessageId(b"m-\x1b[2J")],
        )
        .await;
    let out = env.command().args(["dlq", "list"]).output().unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("m-\u{fffd}"), "{text}");
    assert!(text.contains("m-\\u{1b}[2J"), "{text}");
    assert!(
        !text.contains('\u{1b}'),
        "no raw escape reaches the terminal: {text:?}"
    );
    assert_eq!(
        crate::dlq::dlq_list(&env).len(),
        2,
        "both listed, none taken"
    );
    // A replay reads them all too: they go back to the jobs queue.
    let report = crate::dlq::dlq_replay(&env, &["--include-invalid"]);
    assert_eq!(report["replayed"], 2, "{report}");
    assert_eq!(env.ready(&env.settings.amqp.jobs_queue).await, 2);
    env.cleanup().await;
}

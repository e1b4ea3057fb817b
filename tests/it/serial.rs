//! Faults that hit every test running at the time (restarting the broker), and a three-node
//! cluster that loses a node (scripts/cluster.sh, apart from the machine's broker). `make test`
//! runs these on their own, one at a time, after the rest of the suite.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use imagegen::amqp::connect;
use imagegen::domain::event::{CloudEvent, Status};
use lapin::options::{BasicAckOptions, BasicConsumeOptions};
use serde_json::json;

use crate::helpers::{Store, TestEnv, stop_cleanly};

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_broker_restart_mid_run_loses_no_job() {
    let mut env = TestEnv::new(Store::Fs).await;
    env.fake().set_latency(Duration::from_millis(100));
    let data = tempfile::tempdir().unwrap();
    let jobs = 300;
    for i in 0..jobs {
        env.publish(json!({"id": format!("r{i}"), "prompt": format!("restart job {i}")}))
            .await;
    }
    let vars = [("IMAGEGEN__WORKER__CONCURRENCY", "8")];
    let workers = [
        env.spawn_worker(data.path(), &vars),
        env.spawn_worker(data.path(), &vars),
    ];
    let deadline = Instant::now() + Duration::from_secs(60);
    while env.fake().stats().billed < 40 {
        assert!(Instant::now() < deadline, "the run never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Restart the broker application: every connection drops, durable queues come back.
    rabbitmqctl(&["stop_app"]);
    tokio::time::sleep(Duration::from_secs(1)).await;
    rabbitmqctl(&["start_app"]);
    rabbitmqctl(&["await_startup"]);

    // Read the durable results queue on a fresh connection until every job has its event.
    let connection = connect(&env.settings, "test-after-restart").await.unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut consumer = channel
        .basic_consume(
            env.settings.amqp.results_queue.as_str().into(),
            "".into(),
            BasicConsumeOptions::default(),
            Default::default(),
        )
        .await
        .unwrap();
    let mut seen: HashMap<String, CloudEvent> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(120);
    while seen.len() < jobs {
        let left = deadline.saturating_duration_since(Instant::now());
        let delivery = tokio::time::timeout(left, consumer.next())
            .await
            .unwrap_or_else(|_| panic!("{} of {jobs} jobs have an event", seen.len()))
            .unwrap()
            .unwrap();
        delivery
            .acker
            .ack(BasicAckOptions::default())
            .await
            .unwrap();
        let event: CloudEvent = serde_json::from_slice(&delivery.data).unwrap();
        if let Some(earlier) = seen.get(&event.data.job_id) {
            assert_eq!(earlier, &event, "a republished event is identical");
        } else {
            seen.insert(event.data.job_id.clone(), event);
        }
    }
    assert!(seen.values().all(|e| e.data.status == Status::Succeeded));
    let billed = env.fake().stats().billed as usize;
    // Calls in flight when the broker went away finish and are stored; their redeliveries find
    // the result (or the lease of the other process): nothing is bought twice.
    assert_eq!(billed, jobs, "{billed} billed for {jobs} jobs");
    stop_cleanly(workers).await;
    let _ = channel.close(200, "ok".into()).await;
    let _ = connection.close(200, "ok".into()).await;
    env.reconnect().await;
    env.cleanup().await;
}

/// `scripts/cluster.sh` with `args`; its output.
fn cluster(args: &[&str]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/cluster.sh");
    let out = std::process::Command::new("bash")
        .arg(script)
        .args(args)
        .output()
        .expect("scripts/cluster.sh runs");
    assert!(
        out.status.success(),
        "cluster.sh {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// What happens to the cluster mid-run.
#[derive(Debug, Clone, Copy, PartialEq)]
enum ClusterFault {
    /// `kill -9` of the node that leads the jobs queue.
    KillLeader,
    /// Each node stopped cleanly and started again, in turn.
    RollingRestart,
    /// The node one worker is connected to stopped cleanly (and started again at the end).
    StopWorkersNode,
}

/// The node (1-3) a connection of this test's workers is on: the broker's port of a connection
/// whose name (`{connection_name} worker pid=P node=...`) says it is a worker's.
fn a_workers_node(env: &TestEnv) -> u32 {
    let connections = cluster(&["connections"]);
    let worker = format!("{} worker pid=", env.settings.amqp.connection_name);
    connections
        .lines()
        .filter(|c| c.contains(&worker))
        .find_map(|c| c.split_whitespace().next()?.parse::<u32>().ok())
        .map(|port| port - 5680)
        .unwrap_or_else(|| panic!("no worker connection among {connections}"))
}

/// Three workers and 600 jobs on the cluster, `fault` mid-run: every job has exactly one
/// outcome (a republished event is the same event), nothing is left in the jobs queue, no
/// worker exits, and calls bought twice stay within the prefetch of the connections lost.
async fn cluster_run(fault: ClusterFault) {
    cluster(&["start"]);
    let urls = cluster(&["urls"]);
    let mut env = TestEnv::with(Store::Fs, &[("amqp.url", urls.clone())]).await;
    // Long enough a run for the fault to land in its middle.
    let latency = match fault {
        ClusterFault::KillLeader => 100,
        ClusterFault::RollingRestart => 2000,
        ClusterFault::StopWorkersNode => 500,
    };
    env.fake().set_latency(Duration::from_millis(latency));
    let data = tempfile::tempdir().unwrap();
    let jobs = 600;
    for i in 0..jobs {
        env.publish(json!({"id": format!("c{i}"), "prompt": format!("cluster job {i}")}))
            .await;
    }
    let vars = [
        ("IMAGEGEN__AMQP__URL", urls.as_str()),
        ("IMAGEGEN__WORKER__CONCURRENCY", "8"),
    ];
    let mut workers = [
        env.spawn_worker(data.path(), &vars),
        env.spawn_worker(data.path(), &vars),
        env.spawn_worker(data.path(), &vars),
    ];
    let deadline = Instant::now() + Duration::from_secs(120);
    while env.fake().stats().billed < 100 {
        assert!(Instant::now() < deadline, "the run never started");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // How many connections the fault may cost each worker.
    let (losses, back) = match fault {
        ClusterFault::KillLeader => {
            // The node that leads the jobs queue goes away at once.
            let leader = cluster(&["leader", &env.settings.amqp.jobs_queue]);
            cluster(&["kill-node", &leader]);
            (1, vec![leader])
        }
        ClusterFault::RollingRestart => {
            for node in ["1", "2", "3"] {
                cluster(&["stop-node", node]);
                let billed = env.fake().stats().billed;
                let deadline = Instant::now() + Duration::from_secs(60);
                // The run goes on without the node.
                while env.fake().stats().billed < billed + 20 {
                    assert!(Instant::now() < deadline, "no progress without node {node}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
                cluster(&["start-node", node]);
            }
            (3, Vec::new())
        }
        ClusterFault::StopWorkersNode => {
            let node = a_workers_node(&env).to_string();
            cluster(&["stop-node", &node]);
            (1, vec![node])
        }
    };

    // Read the durable results queue (from a node still up) until every job has its event. Its
    // leader may have gone with the node: a consume refused while another is elected, or a
    // consumer cut off, is tried again.
    let mut seen: HashMap<String, CloudEvent> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.len() < jobs {
        assert!(
            Instant::now() < deadline,
            "{fault:?}: {} of {jobs} jobs have an event",
            seen.len()
        );
        env.reconnect().await;
        let Ok(channel) = env.connection.create_channel().await else {
            continue;
        };
        let consumer = channel
            .basic_consume(
                env.settings.amqp.results_queue.as_str().into(),
                "".into(),
                BasicConsumeOptions::default(),
                Default::default(),
            )
            .await;
        let Ok(mut consumer) = consumer else {
            tokio::time::sleep(Duration::from_secs(1)).await;
            continue;
        };
        while let Ok(Some(Ok(delivery))) =
            tokio::time::timeout(Duration::from_secs(10), consumer.next()).await
        {
            let _ = delivery.acker.ack(BasicAckOptions::default()).await;
            let event: CloudEvent = serde_json::from_slice(&delivery.data).unwrap();
            if let Some(earlier) = seen.get(&event.data.job_id) {
                assert_eq!(earlier, &event, "a republished event is identical");
            } else {
                seen.insert(event.data.job_id.clone(), event);
            }
            if seen.len() == jobs {
                break;
            }
        }
        let _ = channel.close(200, "ok".into()).await;
    }
    assert!(seen.values().all(|e| e.data.status == Status::Succeeded));
    for worker in &mut workers {
        assert!(
            worker.try_wait().unwrap().is_none(),
            "{fault:?}: no worker exited"
        );
    }
    // Calls in flight on a lost connection may be bought again once their messages are
    // redelivered: at most each worker's prefetch (8 + 8 / 4 + 1) per connection it lost.
    let billed = env.fake().stats().billed as usize;
    assert!(
        billed <= jobs + 3 * losses * 11,
        "{fault:?}: {billed} billed for {jobs} jobs"
    );
    assert_eq!(
        env.ready(&env.settings.amqp.jobs_queue).await,
        0,
        "{fault:?}: nothing left"
    );
    stop_cleanly(workers).await;
    for node in back {
        cluster(&["start-node", &node]);
    }
    env.cleanup().await;
    cluster(&["stop"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_node_killed_mid_run_loses_no_job_and_buys_little_twice() {
    cluster_run(ClusterFault::KillLeader).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_of_the_cluster_mid_run_loses_no_job() {
    cluster_run(ClusterFault::RollingRestart).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_a_worker_is_on_stopped_mid_run_loses_no_job() {
    cluster_run(ClusterFault::StopWorkersNode).await;
}

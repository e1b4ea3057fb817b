//! Pacing against the provider's rate limits: as fast as the account allows, never much faster.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use imagegen_fakes::openai::Stats;
use serde_json::json;

use crate::helpers::{Store, TestEnv};

/// Requests per minute the fake account allows.
const RPM: u64 = 240;

fn too_many(stats: &Stats) -> u64 {
    stats.errors_by_status.get(&429).copied().unwrap_or(0)
}

/// Two workers (two throttles, as two replicas would have) share one account limited to R
/// requests a minute for three minutes. After the first minute (which starts with the account's
/// bucket full), at most 2 % of requests get a 429, the fleet gets at least 90 % of R, and the
/// rate holds steady: no retry storm, no oscillation.
#[tokio::test]
async fn a_fleet_keeps_to_the_account_rate_limit_without_429_storms() {
    let env = TestEnv::with(
        Store::Fs,
        &[
            ("worker.concurrency", "16".into()),
            ("limits.log_every_secs", "10".into()),
        ],
    )
    .await;
    env.fake().set_latency(Duration::from_millis(250));
    env.fake().set_limits(Some(RPM), None);
    // More than three minutes can take: the queue never runs dry.
    env.publish_many(
        (0..1500).map(|i| json!({"id": format!("j{i}"), "prompt": format!("paced job {i}")})),
    )
    .await;
    let workers = [env.start_worker().await, env.start_worker().await];
    let started = Instant::now();
    let mut samples: BTreeMap<u64, Stats> = BTreeMap::new();
    for at in (10..=180).step_by(10) {
        let due = started + Duration::from_secs(at);
        tokio::time::sleep(due.saturating_duration_since(Instant::now())).await;
        samples.insert(at, env.fake().stats());
    }
    for worker in workers {
        worker.shutdown().await.expect("worker stops cleanly");
    }
    let table: Vec<String> = samples
        .iter()
        .map(|(t, s)| {
            format!(
                "t={t}s requests={} billed={} 429={}",
                s.requests,
                s.billed,
                too_many(s)
            )
        })
        .collect();
    let table = table.join("\n");
    eprintln!("{table}");

    let (first, last) = (&samples[&60], &samples[&180]);
    let requests = last.requests - first.requests;
    let billed = last.billed - first.billed;
    let refused = too_many(last) - too_many(first);
    assert!(
        refused as f64 <= 0.02 * requests as f64,
        "{refused} of {requests} requests got a 429 after the first minute\n{table}"
    );
    let expected = RPM * 2;
    assert!(
        billed as f64 >= 0.9 * expected as f64,
        "{billed} images in two minutes, below 90 % of {expected}\n{table}"
    );
    assert!(
        billed <= expected + RPM / 4,
        "{billed} images in two minutes: more than the account allows ({expected})\n{table}"
    );
    // Steady: every 20 s window after the first minute gets its share, within 25 %.
    let share = RPM as f64 / 3.0;
    for at in (80..=180).step_by(20) {
        let window = samples[&at].billed - samples[&(at - 20)].billed;
        assert!(
            (window as f64 - share).abs() <= 0.25 * share,
            "{window} images in the 20 s before t={at}s, expected about {share}\n{table}"
        );
    }
    env.cleanup().await;
}

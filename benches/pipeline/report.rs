//! The tables printed after the runs, with the targets.

use super::*;
pub(crate) fn round(x: f64, digits: i32) -> f64 {
    let f = 10f64.powi(digits);
    (x * f).round() / f
}

/// Nearest-rank percentile of sorted values.
pub(crate) fn percentile(sorted: &[u64], p: f64) -> Option<u64> {
    if sorted.is_empty() {
        return None;
    }
    let rank = ((p * sorted.len() as f64).ceil() as usize).clamp(1, sorted.len());
    Some(sorted[rank - 1])
}

/// The human-readable tables, with the targets.
pub(crate) fn report(results: &[Value]) -> String {
    let mut out = String::new();
    let f = |v: &Value, p: &str| v.pointer(p).cloned().unwrap_or(Value::Null);
    // serde_json's Display ignores widths: format through a String.
    let s = |v: Value| match v {
        Value::Null => "-".to_string(),
        Value::String(s) => s,
        v => v.to_string(),
    };
    let num = |v: Value, d: usize| match v.as_f64() {
        Some(x) => format!("{x:.d$}"),
        None => "-".into(),
    };
    let _ = writeln!(
        out,
        "{:<8} {:>6} {:>5} {:>6} {:>6} {:>8} {:>8} {:>7} {:>6} {:>8} {:>8} {:>7} {:>7} {:>6} {:>6} {:>5}",
        "run",
        "N",
        "conc",
        "lat_ms",
        "img_KB",
        "wall_s",
        "jobs/s",
        "bound",
        "ratio",
        "cpu_ms/j",
        "rss_MiB",
        "p50_ms",
        "p99_ms",
        "calls",
        "billed",
        "fail"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:<8} {:>6} {:>5} {:>6} {:>6} {:>8} {:>8} {:>7} {:>6} {:>8} {:>8} {:>7} {:>7} {:>6} {:>6} {:>5}",
            f(r, "/label").as_str().unwrap_or("?"),
            s(f(r, "/n")),
            s(f(r, "/concurrency")),
            s(f(r, "/latency_ms")),
            f(r, "/image_bytes").as_u64().map_or(0, |b| b / 1000),
            num(f(r, "/wall_secs"), 2),
            num(f(r, "/throughput_jobs_per_sec"), 1),
            num(f(r, "/bound_jobs_per_sec"), 1),
            num(f(r, "/ratio_to_bound"), 3),
            num(f(r, "/worker_cpu_ms_per_job"), 3),
            num(
                json!(f(r, "/worker_peak_rss_kib").as_f64().map(|k| k / 1024.0)),
                1
            ),
            s(f(r, "/job_duration_ms/p50")),
            s(f(r, "/job_duration_ms/p99")),
            s(f(r, "/fake_api/requests")),
            s(f(r, "/fake_api/billed")),
            s(f(r, "/events/failed")),
        );
    }
    big_table(&mut out, results);
    let _ = writeln!(
        out,
        "\nCPU seconds from the worker's start to the last event (host capacity = wall x cores):"
    );
    let _ = writeln!(
        out,
        "{:<8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}  top other",
        "run",
        "worker",
        "rabbitmq",
        "garage",
        "fake_api",
        "harness",
        "other",
        "host_busy",
        "capacity"
    );
    for r in results {
        let c = |k: &str| num(f(r, &format!("/cpu_secs_during_run/{k}")), 2);
        let top: Vec<String> = f(r, "/cpu_secs_during_run/top_other_processes")
            .as_array()
            .map(|a| {
                a.iter()
                    .take(3)
                    .map(|p| format!("{} {}", p["comm"].as_str().unwrap_or("?"), p["cpu_secs"]))
                    .collect()
            })
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "{:<8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>8} {:>9} {:>9}  {}",
            f(r, "/label").as_str().unwrap_or("?"),
            c("worker"),
            c("rabbitmq"),
            c("garage"),
            c("fake_api"),
            c("harness"),
            c("other"),
            c("host_busy"),
            c("host_capacity"),
            top.join(", ")
        );
    }
    let _ = writeln!(out, "\nTargets:");
    let mut lines = String::new();
    let mut check = |label: &str, what: &str, value: Option<f64>, target: f64, at_least: bool| {
        let out = &mut lines;
        if let Some(v) = value {
            let met = if at_least { v >= target } else { v <= target };
            let op = if at_least { ">=" } else { "<=" };
            let _ = writeln!(
                out,
                "  {label:<6} {what:<22} {v:>9.3} {op} {target:<6} {}",
                if met { "met" } else { "MISSED" }
            );
        }
    };
    let mut skipped = Vec::new();
    for r in results {
        let label = f(r, "/label").as_str().unwrap_or("?").to_string();
        if r["non_default_settings"]
            .as_array()
            .is_some_and(|a| !a.is_empty())
        {
            skipped.push(format!(
                "  {label:<6} not checked: run with {}",
                r["non_default_settings"]
            ));
            continue;
        }
        match f(r, "/scenario").as_str() {
            Some("a") => {
                check(
                    &label,
                    "ratio to bound",
                    f(r, "/ratio_to_bound").as_f64(),
                    TARGET_RATIO,
                    true,
                );
                check(
                    &label,
                    "CPU ms per job",
                    f(r, "/worker_cpu_ms_per_job").as_f64(),
                    TARGET_CPU_MS_PER_JOB,
                    false,
                );
                check(
                    &label,
                    "peak RSS MiB",
                    f(r, "/worker_peak_rss_kib").as_f64().map(|k| k / 1024.0),
                    TARGET_RSS_MIB,
                    false,
                );
            }
            Some("b") => {
                check(
                    &label,
                    "CPU ms per job",
                    f(r, "/worker_cpu_ms_per_job").as_f64(),
                    TARGET_CPU_MS_PER_JOB,
                    false,
                );
            }
            Some("jitter" | "burst") => {
                let mib = |p: &str| f(r, p).as_f64().map(|k| k / 1024.0);
                check(
                    &label,
                    "ratio to ideal",
                    f(r, "/ratio_to_ideal").as_f64(),
                    TARGET_RATIO_TO_IDEAL,
                    true,
                );
                check(
                    &label,
                    "CPU ms above floor",
                    f(r, "/cpu_ms_above_floor").as_f64(),
                    TARGET_CPU_MS_ABOVE_FLOOR,
                    false,
                );
                let limit = if f(r, "/scenario") == "burst" {
                    Some(TARGET_BURST_RSS_MIB)
                } else {
                    // Idle RSS + the answer memory + 64 KiB per slot.
                    mib("/worker_idle_rss_kib").map(|idle| {
                        idle + f(r, "/answer_memory_bytes").as_f64().unwrap_or(0.0)
                            / (1024.0 * 1024.0)
                            + f(r, "/concurrency").as_f64().unwrap_or(0.0) * TARGET_RSS_PER_SLOT_KIB
                                / 1024.0
                    })
                };
                if let Some(limit) = limit {
                    check(
                        &label,
                        "peak RSS MiB",
                        mib("/worker_peak_rss_kib"),
                        limit,
                        false,
                    );
                }
            }
            Some("fleet")
                if f(r, "/limit_jobs_per_sec").as_f64() < f(r, "/bound_jobs_per_sec").as_f64() =>
            {
                let limit = f(r, "/limit_jobs_per_sec")
                    .as_f64()
                    .unwrap_or(f64::INFINITY);
                check(
                    &label,
                    "rate / limit after 1 min",
                    f(r, "/rate_after_first_minute").as_f64().map(|x| x / limit),
                    TARGET_FLEET_RATIO,
                    true,
                );
                check(
                    &label,
                    "share of 429s",
                    f(r, "/share_429").as_f64(),
                    TARGET_FLEET_429,
                    false,
                );
            }
            Some("fleet") => {
                check(
                    &label,
                    "ratio to k x C / L",
                    f(r, "/ratio_to_bound").as_f64(),
                    TARGET_FLEET_RATIO,
                    true,
                );
            }
            _ => {}
        }
    }
    out.push_str(&lines);
    for line in skipped {
        let _ = writeln!(out, "{line}");
    }
    let v: Vec<&Value> = results
        .iter()
        .filter(|r| r["scenario"] == "variants")
        .collect();
    for pair in v.chunks(2) {
        if let [without, with] = pair {
            let cpu = |r: &Value| r["worker_cpu_ms_per_job"].as_f64().unwrap_or(0.0);
            let _ = writeln!(
                out,
                "  variants: {:.2} ms of worker CPU per 1024x1024 image for two variants (512x512 \
                 WebP, 256x256 JPEG): {:.2} ms per job with them, {:.2} without",
                cpu(with) - cpu(without),
                cpu(with),
                cpu(without)
            );
        }
    }
    let lane: Vec<&Value> = results.iter().filter(|r| r["scenario"] == "lane").collect();
    for pair in lane.chunks(2) {
        if let [small, large] = pair {
            let rss = |r: &Value| r["worker_peak_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0;
            let cpu = |r: &Value| r["worker_cpu_ms_per_job"].as_f64().unwrap_or(0.0);
            let out_mb = |r: &Value| {
                r["fake_api"]["batch"]["output_bytes_served"]
                    .as_f64()
                    .unwrap_or(0.0)
                    / 1e6
            };
            let growth = rss(large) / rss(small).max(f64::MIN_POSITIVE);
            let _ = writeln!(
                out,
                "  lane: output file {:.0} MB: peak RSS {:.1} MiB, {:.2} ms CPU per job; {:.0} MB: \
                 {:.1} MiB, {:.2} ms: x{growth:.2} {}",
                out_mb(small),
                rss(small),
                cpu(small),
                out_mb(large),
                rss(large),
                cpu(large),
                if growth <= 1.10 {
                    "flat (within 10%)"
                } else {
                    "NOT flat (grew more than 10%)"
                }
            );
        }
    }
    let d: Vec<&Value> = results.iter().filter(|r| r["scenario"] == "d").collect();
    for pair in d.chunks(2) {
        if let [small, large] = pair {
            let rss = |r: &Value| r["worker_peak_rss_kib"].as_f64().unwrap_or(0.0) / 1024.0;
            let growth = rss(large) / rss(small).max(f64::MIN_POSITIVE);
            let _ = writeln!(
                out,
                "  {:<6} peak RSS N={} {:.1} MiB vs N={} {:.1} MiB: x{growth:.2} {}",
                large["label"].as_str().unwrap_or("d"),
                small["n"],
                rss(small),
                large["n"],
                rss(large),
                if growth <= 1.10 {
                    "flat (within 10%)"
                } else {
                    "NOT flat (grew more than 10%)"
                }
            );
            let mib = |k: &str| {
                large["worker_rss_kib_when_done"][k]
                    .as_f64()
                    .map_or("-".into(), |v| format!("{:.1}", v / 1024.0))
            };
            let _ = writeln!(
                out,
                "         RSS of the N={} worker at 10% / 50% / 90% of its events: {} / {} / {} MiB",
                large["n"],
                mib("10%"),
                mib("50%"),
                mib("90%")
            );
        }
    }
    out
}

/// The runs with jitter, ticks or several workers: against the ideal, the floor and the limit.
fn big_table(out: &mut String, results: &[Value]) {
    let big: Vec<&Value> = results
        .iter()
        .filter(|r| matches!(r["scenario"].as_str(), Some("jitter" | "burst" | "fleet")))
        .collect();
    if big.is_empty() {
        return;
    }
    let num = |v: &Value, d: usize| match v.as_f64() {
        Some(x) => format!("{x:.d$}"),
        None => "-".into(),
    };
    let mib = |v: &Value| num(&json!(v.as_f64().map(|k| k / 1024.0)), 1);
    let _ = writeln!(
        out,
        "\n{:<16} {:>5} {:>3} {:>4} {:>11} {:>6} {:>6} {:>7} {:>7} {:>6} {:>6} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>5} {:>6} {:>6}",
        "run",
        "N",
        "k",
        "conc",
        "latency_ms",
        "tick",
        "img_KB",
        "wall_s",
        "ideal_s",
        "ratio",
        "start",
        "past",
        "mid/s",
        "limit",
        "429%",
        "cpu/j",
        "floor",
        "above",
        "flt/j",
        "idle",
        "peakMB",
        "sockMB"
    );
    for r in big {
        let latency = format!("{}+-{}", r["latency_ms"], r["jitter_ms"]);
        let _ = writeln!(
            out,
            "{:<16} {:>5} {:>3} {:>4} {:>11} {:>6} {:>6} {:>7} {:>7} {:>6} {:>6} {:>6} {:>7} {:>6} {:>6} {:>6} {:>6} {:>6} {:>6} {:>5} {:>6} {:>6}",
            r["label"].as_str().unwrap_or("?"),
            r["n"],
            r["workers"],
            r["concurrency"],
            latency,
            r["tick_ms"].as_u64().map_or("-".into(), |t| t.to_string()),
            r["image_bytes"].as_u64().map_or(0, |b| b / 1000),
            num(&r["wall_secs"], 1),
            num(&r["ideal_secs"], 1),
            num(&r["ratio_to_ideal"], 3),
            num(&r["first_call_secs"], 2),
            num(&r["past_ideal_secs"], 2),
            num(&r["rate_25_75_jobs_per_sec"], 1),
            num(&r["limit_jobs_per_sec"], 1),
            num(&json!(r["share_429"].as_f64().map(|x| x * 100.0)), 2),
            num(&r["worker_cpu_ms_per_job"], 2),
            num(&r["floor"]["floor_ms"], 2),
            num(&r["cpu_ms_above_floor"], 2),
            num(&r["worker_minor_faults_per_job"], 0),
            mib(&r["worker_idle_rss_kib"]),
            mib(&r["worker_peak_rss_kib"]),
            mib(&r["worker_peak_socket_kib"]),
        );
    }
}

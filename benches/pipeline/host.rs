//! What the host says: CPU time and memory of processes (/proc), the machine, idleness.

use super::*;
pub(crate) fn clock_ticks() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse().ok())
        .unwrap_or(100.0)
}

/// (comm, utime + stime in clock ticks) of a process.
pub(crate) fn proc_ticks(pid: u32) -> Option<(String, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat[open + 1..close].to_string();
    let fields: Vec<&str> = stat[close + 1..].split_whitespace().collect();
    // After the comm: state is field 3, utime 14 and stime 15 (1-based, man 5 proc).
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some((comm, utime + stime))
}

/// The minor page faults of a process so far (field 10 of /proc/PID/stat): pages it touched
/// for the first time, each mapped and cleared by the kernel.
pub(crate) fn proc_minor_faults(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let close = stat.rfind(')')?;
    stat[close + 1..].split_whitespace().nth(7)?.parse().ok()
}

/// A `kB` (or plain number) field of /proc/PID/status.
pub(crate) fn status_kib(pid: u32, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
}

/// (busy, total) ticks of the host's CPUs, from /proc/stat.
pub(crate) fn host_ticks() -> (u64, u64) {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return (0, 0);
    };
    let v: Vec<u64> = stat
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .skip(1)
        .filter_map(|x| x.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal (guest time is inside user).
    let total: u64 = v.iter().take(8).sum();
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    (total.saturating_sub(idle), total)
}

/// CPU ticks of every process named `comm`.
pub(crate) fn ticks_of(comm: &str) -> u64 {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return 0;
    };
    dir.flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter_map(proc_ticks)
        .filter(|(c, _)| c == comm)
        .map(|(_, t)| t)
        .sum()
}

/// Samples the host over 3 s (1 s when not waiting) until its busy fraction is at most `below`
/// or `limit` has passed. Returns the last sample: the host's busy fraction, and Garage's CPU use
/// in cores (it frees deleted objects' blocks in the background, long after the deletes).
pub(crate) async fn wait_idle(limit: Duration, below: f64) -> (f64, f64) {
    let deadline = Instant::now() + limit;
    let tck = clock_ticks();
    loop {
        let started = Instant::now();
        let ((b0, t0), g0) = (host_ticks(), ticks_of("garage"));
        tokio::time::sleep(Duration::from_secs(if limit.is_zero() { 1 } else { 3 })).await;
        let ((b1, t1), g1) = (host_ticks(), ticks_of("garage"));
        let busy = (b1 - b0) as f64 / (t1 - t0).max(1) as f64;
        let garage = g1.saturating_sub(g0) as f64 / tck / started.elapsed().as_secs_f64();
        if busy <= below || Instant::now() >= deadline {
            return (busy, garage);
        }
    }
}

/// CPU ticks of every process, and of the host (busy and total) from /proc/stat.
pub(crate) struct CpuSnapshot {
    procs: HashMap<u32, (String, u64)>,
    host_busy: u64,
    host_total: u64,
}

impl CpuSnapshot {
    pub(crate) fn take() -> Self {
        let mut procs = HashMap::new();
        if let Ok(dir) = std::fs::read_dir("/proc") {
            for entry in dir.flatten() {
                if let Some(pid) = entry
                    .file_name()
                    .to_str()
                    .and_then(|s| s.parse::<u32>().ok())
                    && let Some(t) = proc_ticks(pid)
                {
                    procs.insert(pid, t);
                }
            }
        }
        let (busy, total) = host_ticks();
        Self {
            procs,
            host_busy: busy,
            host_total: total,
        }
    }

    /// CPU seconds used between `before` and `self`, by group.
    pub(crate) fn delta(
        &self,
        before: &CpuSnapshot,
        workers: &[u32],
        fake: u32,
        tck: f64,
    ) -> Value {
        let me = std::process::id();
        let mut groups: BTreeMap<&str, u64> = BTreeMap::new();
        let mut others: HashMap<String, u64> = HashMap::new();
        let mut known = 0;
        for (pid, (comm, ticks)) in &self.procs {
            let prior = before
                .procs
                .get(pid)
                // Same pid (kernel workers rename themselves as they go), not a reused one.
                .filter(|(_, t)| t <= ticks)
                .map_or(0, |(_, t)| *t);
            let used = ticks.saturating_sub(prior);
            let group = match comm.as_str() {
                _ if workers.contains(pid) => "worker",
                _ if *pid == fake => "fake_api",
                _ if *pid == me => "harness",
                "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => "rabbitmq",
                "garage" => "garage",
                _ => {
                    let name = if comm.starts_with("kworker") {
                        "kworker".to_string()
                    } else {
                        comm.clone()
                    };
                    *others.entry(name).or_default() += used;
                    continue;
                }
            };
            *groups.entry(group).or_default() += used;
            known += used;
        }
        let secs = |t: u64| round(t as f64 / tck, 2);
        let host_busy = self.host_busy.saturating_sub(before.host_busy);
        let host_total = self.host_total.saturating_sub(before.host_total);
        let mut top: Vec<(String, u64)> = others.into_iter().filter(|(_, t)| *t > 0).collect();
        top.sort_by_key(|t| std::cmp::Reverse(t.1));
        top.truncate(5);
        let mut out = serde_json::Map::new();
        for g in ["worker", "rabbitmq", "garage", "fake_api", "harness"] {
            out.insert(g.into(), json!(secs(groups.get(g).copied().unwrap_or(0))));
        }
        out.insert("other".into(), json!(secs(host_busy.saturating_sub(known))));
        out.insert("host_busy".into(), json!(secs(host_busy)));
        out.insert("host_capacity".into(), json!(secs(host_total)));
        out.insert(
            "host_busy_fraction".into(),
            json!(round(host_busy as f64 / host_total.max(1) as f64, 3)),
        );
        out.insert(
            "top_other_processes".into(),
            json!(
                top.into_iter()
                    .map(|(c, t)| json!({ "comm": c, "cpu_secs": secs(t) }))
                    .collect::<Vec<_>>()
            ),
        );
        Value::Object(out)
    }
}

pub(crate) fn command_output(program: &str, args: &[&str]) -> Option<String> {
    let out = Command::new(program).args(args).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout).trim().to_string();
    (out.status.success() && !text.is_empty()).then_some(text)
}

pub(crate) fn machine_info(bin: &Path) -> Value {
    let lscpu = command_output("lscpu", &[]).unwrap_or_default();
    let field = |name: &str| {
        lscpu
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .map(|s| s.trim().to_string())
    };
    // Hosts that print the same model name ("AMD EPYC") differ by generation: the family and
    // model numbers tell them apart (AMD family 23: Zen 2, 25: Zen 3/4, 26: Zen 5).
    let model = field("Model name:");
    let generation = field("CPU family:")
        .map(|f| format!("family {f} model {}", field("Model:").unwrap_or_default()));
    let mem_kib = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    });
    json!({
        "cpu_model": model,
        "cpu_family_model": generation,
        "cpus": std::thread::available_parallelism().map(|n| n.get()).ok(),
        "mem_total_mib": mem_kib.map(|k| k / 1024),
        "kernel": std::fs::read_to_string("/proc/sys/kernel/osrelease").ok().map(|s| s.trim().to_string()),
        "os": std::fs::read_to_string("/etc/os-release").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("PRETTY_NAME=")).map(|v| v.trim_matches('"').to_string())),
        "rabbitmq": command_output("rabbitmqctl", &["version"]),
        "erlang": command_output("dpkg-query", &["-W", "-f", "${Version}", "erlang-base"]),
        "garage": command_output("garage", &["--version"]),
        "imagegen": command_output(&bin.display().to_string(), &["--version"]),
        "imagegen_binary": bin.display().to_string(),
        "imagegen_binary_sha256": std::fs::read(bin).ok().map(|b| hex::encode(Sha256::digest(b))),
        "rustc": command_output("rustc", &["--version"]),
        "git_commit": command_output("git", &["rev-parse", "--short", "HEAD"]),
        "git_src_dirty": command_output("git", &["status", "--porcelain", "--", "src"]).is_some(),
        "loadavg_at_start": std::fs::read_to_string("/proc/loadavg").ok().map(|s| s.trim().to_string()),
    })
}

/// The kernel's memory for the TCP sockets of each of `pids`, in bytes: receive queues,
/// send queues and memory charged ahead (`ss -tmp`'s `skmem` r + w + f), which counts against
/// a container's memory limit like its RSS does. `None` when `ss` cannot be run.
pub(crate) fn socket_bytes(pids: &[u32]) -> Option<Vec<u64>> {
    let out = Command::new("ss").args(["-tmnpH"]).output().ok()?;
    if !out.status.success() {
        return None;
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut totals = vec![0u64; pids.len()];
    let mut owner: Option<usize> = None;
    for line in text.lines() {
        if let Some(at) = line.find("skmem:(") {
            let Some(i) = owner.take() else { continue };
            let fields = &line[at + 7..];
            let fields = &fields[..fields.find(')').unwrap_or(fields.len())];
            for field in fields.split(',') {
                let (name, value) = field.split_at(field.find(|c: char| c.is_ascii_digit())?);
                if matches!(name, "r" | "w" | "f") {
                    totals[i] += value.parse::<u64>().unwrap_or(0);
                }
            }
        }
        if line.contains("users:(") {
            owner = pids
                .iter()
                .position(|p| line.contains(&format!("pid={p},")));
        }
    }
    Some(totals)
}

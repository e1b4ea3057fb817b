//! The scenarios: what each run asks of the worker and of the fake API.

use super::*;

/// One run: a scenario's parameters.
#[derive(Debug, Clone)]
pub(crate) struct RunSpec {
    pub(crate) scenario: &'static str,
    pub(crate) label: String,
    pub(crate) n: usize,
    /// `worker.concurrency` of each worker.
    pub(crate) concurrency: usize,
    /// The fake's mean latency, its seeded jitter (+-) and tick (see `imagegen_fakes::latency`).
    pub(crate) latency_ms: u64,
    pub(crate) jitter_ms: u64,
    pub(crate) seed: u64,
    pub(crate) tick_ms: Option<u64>,
    pub(crate) image_bytes: usize,
    /// Worker processes sharing the queue and the fake's account.
    pub(crate) workers: usize,
    /// The fake account's requests per minute (announced in its rate-limit headers).
    pub(crate) rpm: Option<u64>,
    /// The provider's fake: `openai` (answers at once, after `latency_ms`) or `bfl` (queues
    /// each task for `latency_ms`, at most `max_active` at once; the worker submits and polls).
    pub(crate) provider: &'static str,
    pub(crate) max_active: usize,
    /// Width and height of the fake's images, in pixels (their bytes are padded to
    /// `image_bytes`).
    pub(crate) image_side: u32,
    /// Each job asks for two variants of its image (`outputs`): a 512x512 lossy WebP and a
    /// 256x256 JPEG thumbnail.
    pub(crate) variants: bool,
    /// Every job goes through the batch lane (`lane: "batch"`): recorded, sent in one input
    /// file, bought in one provider batch, and split from its output file.
    pub(crate) lane: bool,
}

impl RunSpec {
    /// The fake's latencies, as it draws them.
    pub(crate) fn schedule(&self) -> Schedule {
        Schedule {
            base: Duration::from_millis(self.latency_ms),
            jitter: Duration::from_millis(self.jitter_ms),
            seed: self.seed,
            tick: self.tick_ms.map(Duration::from_millis),
        }
    }

    /// Provider calls in flight at once, all workers together (for a provider that queues
    /// the work, its tasks active at once: the account's cap).
    pub(crate) fn slots(&self) -> usize {
        match self.provider {
            "bfl" => self.max_active,
            _ => self.concurrency * self.workers,
        }
    }

    /// The account's limit, in calls a second.
    pub(crate) fn limit_per_sec(&self) -> Option<f64> {
        self.rpm.map(|r| r as f64 / 60.0)
    }
}

fn spec(scenario: &'static str, n: usize, concurrency: usize, latency_ms: u64) -> RunSpec {
    RunSpec {
        scenario,
        label: scenario.to_string(),
        n,
        concurrency,
        latency_ms,
        jitter_ms: 0,
        seed: 1,
        tick_ms: None,
        image_bytes: 300_000,
        workers: 1,
        rpm: None,
        provider: "openai",
        max_active: 0,
        image_side: 64,
        variants: false,
        lane: false,
    }
}

/// Fleet runs: each worker's concurrency and the latency, so one worker's bound C / L is 16 calls
/// a second.
const FLEET_C: usize = 16;
const FLEET_L_MS: u64 = 1000;
/// An account limit above 4 x C / L (never binding), and one below C / L (always binding).
const FLEET_RPM_ABOVE: u64 = 6000;
const FLEET_RPM_BELOW: u64 = 480;

pub(crate) fn plan(args: &Args) -> anyhow::Result<Vec<RunSpec>> {
    let names: Vec<&str> = if args.scenario == "all" {
        vec![
            "a", "b", "c", "d", "jitter", "burst", "fleet", "poll", "variants", "lane",
        ]
    } else {
        args.scenario.split(',').map(str::trim).collect()
    };
    let mut runs = Vec::new();
    for name in names {
        match name {
            "a" => runs.push(spec("a", 2000, 32, 500)),
            "b" => runs.push(spec("b", 1000, 32, 0)),
            "c" => runs.push(spec("c", 300, 64, 2000)),
            "d" => {
                if args.n.is_some() {
                    bail!("--n cannot be used with scenario d (it runs N=200 and N=20000)");
                }
                for n in [200, 20_000] {
                    let mut s = spec("d", n, 32, 20);
                    s.label = format!("d/{n}");
                    runs.push(s);
                }
            }
            // Big images, hundreds of calls in flight, latencies of real image models.
            "jitter" => runs.push(RunSpec {
                jitter_ms: 5000,
                image_bytes: 2_000_000,
                ..spec("jitter", 3000, 256, 10_000)
            }),
            // The same, every call of a wave answered at one moment.
            "burst" => runs.push(RunSpec {
                tick_ms: Some(10_000),
                image_bytes: 2_000_000,
                ..spec("burst", 1000, 256, 0)
            }),
            // 1, 2 and 4 workers sharing one account, its limit above and below what they could do.
            "fleet" => {
                for (limit, rpm) in [("above", FLEET_RPM_ABOVE), ("below", FLEET_RPM_BELOW)] {
                    for workers in [1, 2, 4] {
                        // Above: about 50 s of work at the bound. Below: two minutes and more
                        // (the account's bucket starts full, a minute's worth).
                        let n = match limit {
                            "above" => 800 * workers,
                            _ => 1440,
                        };
                        runs.push(RunSpec {
                            label: format!("fleet-{limit}/{workers}"),
                            image_bytes: 100_000,
                            workers,
                            rpm: Some(rpm),
                            ..spec("fleet", n, FLEET_C, FLEET_L_MS)
                        });
                    }
                }
            }
            // Submit and poll: tasks of 20 s at a provider that keeps 24 active at once, the
            // images of (a). The cap, not the worker, bounds it: C / L is 24 / 20 s.
            "poll" => runs.push(RunSpec {
                provider: "bfl",
                max_active: 24,
                ..spec("poll", 300, 32, 20_000)
            }),
            // 1024x1024 images, without variants and with two of each: the difference is the
            // worker CPU the variants cost per image.
            "variants" => {
                for variants in [false, true] {
                    runs.push(RunSpec {
                        label: format!("variants/{}", if variants { 2 } else { 0 }),
                        image_side: 1024,
                        variants,
                        ..spec("variants", 300, 32, 500)
                    });
                }
            }
            // The batch lane: one provider batch whose output file is about 250 MB, then one of
            // about 1 GB (images of 500 KB, 667 KB of base64 a line). The worker's peak RSS must
            // not grow with the file.
            "lane" => {
                for (label, n) in [("lane/250MB", 375), ("lane/1GB", 1500)] {
                    runs.push(RunSpec {
                        label: label.into(),
                        image_bytes: 500_000,
                        lane: true,
                        ..spec("lane", n, 32, 0)
                    });
                }
            }
            other => bail!(
                "unknown scenario {other:?}: expected a, b, c, d, jitter, burst, fleet, poll, variants, lane or all"
            ),
        }
    }
    for run in &mut runs {
        if let Some(n) = args.n {
            run.n = n;
        }
        if let Some(c) = args.concurrency {
            run.concurrency = c;
        }
        if let Some(l) = args.latency_ms {
            run.latency_ms = l;
        }
        if let Some(kb) = args.image_kb {
            run.image_bytes = kb * 1000;
        }
        if run.n == 0 || run.concurrency == 0 {
            bail!("--n and --concurrency must be at least 1");
        }
    }
    let mut all = runs.clone();
    for round in 2..=args.repeat {
        all.extend(runs.iter().map(|r| RunSpec {
            label: format!("{}#{round}", r.label),
            ..r.clone()
        }));
    }
    Ok(all)
}

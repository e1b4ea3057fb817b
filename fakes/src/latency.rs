//! When a fake answers: a latency per call, the same sequence for the same seed, and optionally
//! answers held until a common tick, so that a whole wave of calls is answered at one moment.
//!
//! The n-th call the fake receives (counting from 0) waits `base ± jitter` (uniform, drawn from
//! the seed and n alone, so any process that knows the schedule knows every latency). With a
//! `tick`, its answer is then held until the next multiple of `tick` after that, counted from the
//! first call's arrival: every call whose time comes within one tick is answered at the same
//! moment, as when a provider releases a batch of work at once.
//!
//! [`Schedule::ideal_makespan`] is the time N calls take on C slots with no other cost than these
//! latencies: what a client that did nothing else would achieve, to measure a real one against.

use std::cmp::Reverse;
use std::collections::BinaryHeap;
use std::time::Duration;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Schedule {
    /// The mean latency.
    pub base: Duration,
    /// Each latency is drawn uniformly from `base - jitter ..= base + jitter` (never below 0).
    pub jitter: Duration,
    /// Seeds the draws.
    pub seed: u64,
    /// Answers are held until the next multiple of this after their latency (`None`: not held).
    pub tick: Option<Duration>,
}

impl Schedule {
    /// A constant latency.
    pub fn constant(base: Duration) -> Self {
        Self {
            base,
            ..Self::default()
        }
    }

    /// The latency of the `n`-th call, before any tick.
    pub fn latency(&self, n: u64) -> Duration {
        if self.jitter.is_zero() {
            return self.base;
        }
        let jitter = self.jitter.as_micros() as i64;
        let mut rng = fastrand::Rng::with_seed(self.seed ^ n.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let micros = self.base.as_micros() as i64 + rng.i64(-jitter..=jitter);
        Duration::from_micros(micros.max(0) as u64)
    }

    /// When the `n`-th call, arriving `arrival` after the first call did, is answered (counted
    /// from the first call's arrival too).
    pub fn answer_at(&self, n: u64, arrival: Duration) -> Duration {
        let due = arrival + self.latency(n);
        match self.tick {
            Some(tick) if !tick.is_zero() => {
                let ticks = due.as_nanos() / tick.as_nanos() + 1;
                Duration::from_nanos((ticks * tick.as_nanos()) as u64)
            }
            _ => due,
        }
    }

    /// How long `calls` calls take on `slots` slots when nothing but the provider takes time:
    /// each call starts the moment a slot is free, and the n-th call to start is the fake's n-th.
    pub fn ideal_makespan(&self, calls: u64, slots: usize) -> Duration {
        let mut free: BinaryHeap<Reverse<Duration>> =
            (0..slots.max(1)).map(|_| Reverse(Duration::ZERO)).collect();
        let mut end = Duration::ZERO;
        for n in 0..calls {
            let Reverse(start) = free.pop().expect("at least one slot");
            let done = self.answer_at(n, start);
            end = end.max(done);
            free.push(Reverse(done));
        }
        end
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn latencies_are_drawn_from_the_seed_within_the_jitter() {
        let schedule = Schedule {
            base: 10 * S,
            jitter: 5 * S,
            seed: 42,
            tick: None,
        };
        let draws: Vec<Duration> = (0..1000).map(|n| schedule.latency(n)).collect();
        assert!(draws.iter().all(|d| (5 * S..=15 * S).contains(d)));
        let mean = draws.iter().sum::<Duration>() / 1000;
        assert!((9 * S..11 * S).contains(&mean), "{mean:?}");
        assert_eq!(
            draws[17],
            schedule.latency(17),
            "the same seed, the same draw"
        );
        let other = Schedule {
            seed: 43,
            ..schedule
        };
        assert_ne!(draws[17], other.latency(17));
    }

    #[test]
    fn the_ideal_makespan_of_constant_latencies_is_the_waves_they_make() {
        let schedule = Schedule::constant(10 * S);
        assert_eq!(schedule.ideal_makespan(1000, 256), 40 * S);
        assert_eq!(schedule.ideal_makespan(256, 256), 10 * S);
        assert_eq!(schedule.ideal_makespan(257, 256), 20 * S);
    }

    #[test]
    fn ticks_answer_every_call_of_a_wave_at_the_same_moment() {
        let schedule = Schedule {
            tick: Some(10 * S),
            ..Schedule::default()
        };
        assert_eq!(schedule.answer_at(0, Duration::ZERO), 10 * S);
        assert_eq!(schedule.answer_at(1, 3 * S), 10 * S);
        assert_eq!(schedule.answer_at(2, 10 * S), 20 * S, "strictly after");
        assert_eq!(schedule.ideal_makespan(1000, 256), 40 * S);
    }

    #[test]
    fn jitter_lets_slots_run_out_of_step() {
        let schedule = Schedule {
            base: 10 * S,
            jitter: 5 * S,
            seed: 1,
            tick: None,
        };
        let ideal = schedule.ideal_makespan(3000, 256);
        // About N x L / C = 117 s, plus the tail of the last slots.
        assert!((110 * S..135 * S).contains(&ideal), "{ideal:?}");
        // Computed, not guessed: a slot less takes longer.
        assert!(schedule.ideal_makespan(3000, 255) > ideal);
    }
}

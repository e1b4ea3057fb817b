//! What every provider's fake keeps the same way: faults injected for the next matching requests
//! ([`Rules`]), and the count of requests and billed work per prompt ([`Ledger`]), so that a test
//! can prove that nothing was paid for twice.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Mutex, MutexGuard, PoisonError};

/// A fault injected into the next matching requests.
#[derive(Clone, Debug, serde::Serialize, serde::Deserialize)]
pub struct Rule<F> {
    /// Only requests whose prompt contains this; `None` matches every request.
    pub prompt_contains: Option<String>,
    pub fault: F,
    /// `None`: forever; `Some(k)`: the next `k` matching requests.
    pub times: Option<u32>,
}

/// The injected faults of a fake, in the order they were pushed.
pub(crate) struct Rules<F>(Mutex<Vec<Rule<F>>>);

impl<F> Default for Rules<F> {
    fn default() -> Self {
        Self(Mutex::new(Vec::new()))
    }
}

impl<F: Clone> Rules<F> {
    pub(crate) fn push(&self, rule: Rule<F>) {
        lock(&self.0).push(rule);
    }

    pub(crate) fn clear(&self) {
        lock(&self.0).clear();
    }

    /// The first rule matching `prompt` with uses left; consumes one use.
    pub(crate) fn take(&self, prompt: Option<&str>) -> Option<F> {
        let mut rules = lock(&self.0);
        let idx = rules.iter().position(|r| {
            r.times != Some(0)
                && match &r.prompt_contains {
                    None => true,
                    Some(s) => prompt.is_some_and(|p| p.contains(s.as_str())),
                }
        })?;
        let fault = rules[idx].fault.clone();
        if let Some(left) = rules[idx].times.as_mut() {
            *left -= 1;
            if *left == 0 {
                rules.remove(idx);
            }
        }
        Some(fault)
    }
}

/// Counters since a fake was created.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Stats {
    /// Every request to the provider's work endpoints (submits and synchronous calls; not polls).
    pub requests: u64,
    /// Requests the provider charged for (a refusal after generation is charged too).
    pub billed: u64,
    /// Images made.
    pub images: u64,
    /// Error answers by HTTP status (a reset connection has no status and is not counted).
    pub errors_by_status: BTreeMap<u16, u64>,
}

/// What a fake was asked and what it charged, in all and per prompt.
#[derive(Default)]
pub(crate) struct Ledger(Mutex<LedgerInner>);

#[derive(Default)]
struct LedgerInner {
    stats: Stats,
    /// prompt -> (requests, billed)
    per_prompt: HashMap<String, (u64, u64)>,
}

impl Ledger {
    pub(crate) fn request(&self, prompt: Option<&str>) {
        let mut l = lock(&self.0);
        l.stats.requests += 1;
        if let Some(p) = prompt {
            l.per_prompt.entry(p.to_owned()).or_default().0 += 1;
        }
    }

    pub(crate) fn billed(&self, prompt: &str, images: u64) {
        let mut l = lock(&self.0);
        l.stats.billed += 1;
        l.stats.images += images;
        l.per_prompt.entry(prompt.to_owned()).or_default().1 += 1;
    }

    pub(crate) fn error(&self, status: u16) {
        *lock(&self.0)
            .stats
            .errors_by_status
            .entry(status)
            .or_default() += 1;
    }

    pub(crate) fn stats(&self) -> Stats {
        lock(&self.0).stats.clone()
    }

    /// (requests, billed) of the prompts that contain `needle`.
    pub(crate) fn per_prompt(&self, needle: &str) -> (u64, u64) {
        lock(&self.0)
            .per_prompt
            .iter()
            .filter(|(prompt, _)| prompt.contains(needle))
            .fold((0, 0), |acc, (_, c)| (acc.0 + c.0, acc.1 + c.1))
    }
}

/// A test that panics while a lock is held leaves counters and rules at worst one update behind;
/// the fake keeps serving rather than failing every later request of the other tests.
pub(crate) fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

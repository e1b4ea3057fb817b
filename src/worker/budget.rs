//! Spend caps: per worker process and per batch (fleet-wide).
//!
//! - **Worker cap** (`budget.max_worker_usd`): what this process has bought. Once reached, the
//!   worker stops taking jobs (they go back to the queue, untouched) and says so; it stays paused
//!   until it is restarted, so that an orchestrator restarting it does not reset the count by
//!   itself: a restart is an operator's decision.
//! - **Batch cap** (`budget.max_batch_usd`): what the whole fleet has bought for one batch. Every
//!   paid provider call of a batch job leaves a zero-byte marker in the store,
//!   `{prefix}spend/{batch}/{unix ms}-{micro USD}-{job id}`, so any worker learns a batch's spend
//!   by listing names, without reading objects. A worker lists what is new at most every
//!   `budget.refresh_secs` and counts its own calls at once. Once the cap is reached, the
//!   batch's remaining jobs fail at once with kind `budget_exceeded`, without a provider call,
//!   and are dead-lettered, to be replayed (`imagegen dlq replay`) after the cap is raised.
//!
//! How far a fleet can overshoot a batch cap: calls already in flight when the cap is crossed
//! (at most replicas x worker.concurrency), plus calls started on a spend that was up to
//! `budget.refresh_secs` old (the fleet's call rate x refresh_secs), each costing at most one
//! job's price. With refresh_secs well below the provider's latency, the second term is a
//! fraction of the first: the overshoot stays within replicas x concurrency x the most one job
//! costs.

use std::collections::{BTreeSet, HashMap};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::config::Settings;
use crate::domain::error::{ErrorKind, Failure, StopReason};
use crate::domain::keys;
use crate::provider::queued::unix_ms;
use crate::storage::{ObjectStore, PutObject};

/// Markers older than this (by their writer's clock) than the newest one seen are assumed seen:
/// a refresh lists only the markers of the last window, not the whole batch again.
const MARKER_WINDOW_MS: u64 = 120_000;

const MICROS: f64 = 1_000_000.0;

/// The most one call is charged: a cost beyond any real call (a broken or hostile usage report)
/// counts as this, so that it trips the caps without overflowing the counters.
const MAX_CHARGE_USD: f64 = 1_000_000.0;

fn micros(usd: f64) -> u64 {
    if usd.is_nan() || usd <= 0.0 {
        return 0;
    }
    (usd.min(MAX_CHARGE_USD) * MICROS).round() as u64
}

fn usd(micros: u64) -> f64 {
    micros as f64 / MICROS
}

pub struct Budget {
    max_worker: Option<u64>,
    max_batch: Option<u64>,
    refresh: Duration,
    store: Arc<dyn ObjectStore>,
    prefix: String,
    worker_spent: AtomicU64,
    batches: Mutex<HashMap<String, Arc<tokio::sync::Mutex<Ledger>>>>,
}

/// What this worker knows of one batch's spend.
#[derive(Default)]
struct Ledger {
    spent: u64,
    /// Marker names already counted, within the window of the newest one.
    seen: BTreeSet<String>,
    newest_ms: u64,
    refreshed: Option<Instant>,
}

impl Ledger {
    /// Counts a marker once; false if it was already counted or is not a marker.
    fn count(&mut self, name: &str) -> bool {
        let Some((ms, cost)) = keys::parse_spend_marker(name) else {
            return false;
        };
        if !self.seen.insert(name.to_string()) {
            return false;
        }
        self.spent += cost;
        if ms > self.newest_ms {
            self.newest_ms = ms;
            // Forget names that a windowed listing will not return again.
            let floor = keys::spend_marker(ms.saturating_sub(MARKER_WINDOW_MS), 0, "");
            self.seen = self.seen.split_off(&floor);
        }
        true
    }
}

impl Budget {
    /// `None` when no cap is set.
    pub fn from_settings(settings: &Settings, store: Arc<dyn ObjectStore>) -> Option<Self> {
        let b = &settings.budget;
        let cap = |usd: f64| (usd > 0.0).then(|| micros(usd));
        let budget = Self {
            max_worker: cap(b.max_worker_usd),
            max_batch: cap(b.max_batch_usd),
            refresh: Duration::from_secs_f64(b.refresh_secs),
            store,
            prefix: settings.storage.prefix.clone(),
            worker_spent: AtomicU64::new(0),
            batches: Mutex::default(),
        };
        (budget.max_worker.is_some() || budget.max_batch.is_some()).then_some(budget)
    }

    fn ledger(&self, batch: &str) -> Arc<tokio::sync::Mutex<Ledger>> {
        self.batches
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .entry(batch.to_string())
            .or_default()
            .clone()
    }

    fn spend_dir(&self, batch: &str) -> String {
        keys::spend_dir(&self.prefix, batch)
    }

    /// Before a provider call: `Stop` when this worker's cap is reached, a permanent
    /// `budget_exceeded` failure when the job's batch's cap is.
    pub async fn check(&self, batch: Option<&str>) -> Result<(), Failure> {
        let spent = self.worker_spent.load(Ordering::Relaxed);
        if let Some(cap) = self.max_worker
            && spent >= cap
        {
            return Err(Failure::Stop {
                reason: StopReason::BudgetExhausted,
                message: format!(
                    "this worker has spent ${:.4}, its cap budget.max_worker_usd is ${:.4}",
                    usd(spent),
                    usd(cap)
                ),
                detail: Box::default(),
            });
        }
        let (Some(cap), Some(batch)) = (self.max_batch, batch) else {
            return Ok(());
        };
        let ledger = self.ledger(batch);
        let mut ledger = ledger.lock().await;
        if ledger
            .refreshed
            .is_none_or(|at| at.elapsed() >= self.refresh)
        {
            self.refresh(batch, &mut ledger).await;
        }
        if ledger.spent >= cap {
            return Err(Failure::Permanent {
                kind: ErrorKind::BudgetExceeded,
                message: format!(
                    "batch {batch} has spent ${:.4}, its cap budget.max_batch_usd is ${:.4}: \
                     raise it and replay the dead letters",
                    usd(ledger.spent),
                    usd(cap)
                ),
                detail: Box::default(),
            });
        }
        Ok(())
    }

    /// Lists the batch's markers that are new since the last look.
    async fn refresh(&self, batch: &str, ledger: &mut Ledger) {
        let dir = self.spend_dir(batch);
        // The first look reads every marker; later ones only the recent window.
        let after = (ledger.refreshed.is_some() && ledger.newest_ms > 0).then(|| {
            format!(
                "{dir}{}",
                keys::spend_marker(ledger.newest_ms.saturating_sub(MARKER_WINDOW_MS), 0, "")
            )
        });
        match crate::storage::list_all(&*self.store, &dir, after.as_deref()).await {
            Ok(keys) => {
                for key in keys {
                    ledger.count(key.rsplit('/').next().unwrap_or(""));
                }
                ledger.refreshed = Some(Instant::now());
            }
            // The last known spend stands; the next check tries again.
            Err(e) => warn!(error = %e, batch, "could not read the batch's spend"),
        }
    }

    /// After a paid provider call: counts it for the worker and, for a batch job, leaves its
    /// marker for the fleet.
    pub async fn record(&self, batch: Option<&str>, job_id: &str, cost_usd: f64) {
        let cost = micros(cost_usd);
        let before = self.worker_spent.fetch_add(cost, Ordering::Relaxed);
        if let Some(cap) = self.max_worker
            && before < cap
            && before + cost >= cap
        {
            warn!(
                spent_usd = usd(before + cost),
                cap_usd = usd(cap),
                "this worker reached its spend cap (budget.max_worker_usd)"
            );
        }
        let (Some(cap), Some(batch)) = (self.max_batch, batch) else {
            return;
        };
        let name = keys::spend_marker(unix_ms(), cost, job_id);
        let key = format!("{}{name}", self.spend_dir(batch));
        let written = self
            .store
            .put(PutObject::new(
                &key,
                Bytes::new(),
                "application/octet-stream",
            ))
            .await;
        if let Err(e) = written {
            warn!(error = %e, batch, "could not record the batch's spend: other workers will not see it");
        }
        let ledger = self.ledger(batch);
        let mut ledger = ledger.lock().await;
        let before = ledger.spent;
        ledger.count(&name);
        if before < cap && ledger.spent >= cap {
            info!(
                batch,
                spent_usd = usd(ledger.spent),
                cap_usd = usd(cap),
                "batch reached its spend cap (budget.max_batch_usd): its remaining jobs fail as budget_exceeded"
            );
        }
    }

    /// What this worker has bought since it started, in USD.
    pub fn worker_spent_usd(&self) -> f64 {
        usd(self.worker_spent.load(Ordering::Relaxed))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cost_beyond_any_call_trips_the_caps_without_overflowing() {
        assert_eq!(micros(f64::INFINITY), micros(MAX_CHARGE_USD));
        assert_eq!(micros(1e300), micros(MAX_CHARGE_USD));
        assert_eq!(micros(f64::NAN), 0);
        assert_eq!(micros(-3.0), 0);
        let mut total = 0u64;
        for _ in 0..1000 {
            total = total
                .checked_add(micros(f64::INFINITY))
                .expect("no overflow");
        }
        assert!(usd(total) >= MAX_CHARGE_USD);
    }

    #[test]
    fn markers_are_counted_once_and_old_names_are_forgotten() {
        let mut ledger = Ledger::default();
        assert!(ledger.count(&keys::spend_marker(1_000_000, 40_000, "job-a")));
        assert!(!ledger.count(&keys::spend_marker(1_000_000, 40_000, "job-a")));
        assert!(ledger.count(&keys::spend_marker(1_000_500, 20_000, "job-b-with-dashes")));
        assert!(!ledger.count("not-a-marker"));
        assert_eq!(ledger.spent, 60_000);
        // Far later: the early names leave the window (a windowed listing won't return them).
        assert!(ledger.count(&keys::spend_marker(
            1_000_000 + MARKER_WINDOW_MS + 1000,
            1,
            "job-c"
        )));
        assert_eq!(ledger.seen.len(), 1);
        assert_eq!(ledger.spent, 60_001);
    }
}

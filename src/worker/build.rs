//! The one place a worker is wired together from its settings: the providers, the store (checked
//! usable, and probed for conditional writes), the spend caps, the spool, and the leases.

use std::time::Duration;

use tracing::{info, warn};

use super::budget::Budget;
use super::consumer::Worker;
use super::pipeline::Pipeline;
use super::providers::Routes;
use super::spool::Spool;
use crate::config::Settings;

impl Worker {
    /// Builds the configured providers and store, checks that the store is usable, opens the
    /// spool, and turns on cross-process job leases when the store honours conditional writes.
    pub async fn from_settings(settings: Settings) -> anyhow::Result<Self> {
        // Before anything records a metric.
        super::metrics::install();
        let routes = Routes::from_settings(&settings)?;
        let store = crate::storage::from_settings(&settings).await?;
        store.check().await?;
        let conditional =
            crate::storage::probe_conditional_put(&*store, &settings.storage.prefix).await?;
        let mut pipeline = Pipeline::new(&settings, routes, store.clone());
        if let Some(budget) = Budget::from_settings(&settings, store) {
            info!(
                max_worker_usd = settings.budget.max_worker_usd,
                max_batch_usd = settings.budget.max_batch_usd,
                "spend caps on"
            );
            pipeline = pipeline.with_budget(budget);
        }
        if !settings.spool.dir.as_os_str().is_empty() {
            let spool =
                Spool::open(&settings.spool.dir, settings.spool.max_bytes).map_err(|e| {
                    anyhow::anyhow!(
                        "spool.dir {} cannot be used: {e}",
                        settings.spool.dir.display()
                    )
                })?;
            if spool.used_bytes() > 0 {
                info!(
                    bytes = spool.used_bytes(),
                    "spooled images from an earlier run wait for upload"
                );
            }
            pipeline = pipeline.with_spool(spool);
        }
        if conditional {
            let owner = format!(
                "{}-{}-{:08x}",
                std::env::var("HOSTNAME").unwrap_or_else(|_| "worker".into()),
                std::process::id(),
                fastrand::u32(..)
            );
            let ttl = Duration::from_secs(settings.worker.lease_secs);
            pipeline = pipeline.with_leases(owner, ttl, settings.worker.max_lease_takeovers);
            info!("cross-process job leases on: the store honours conditional writes");
        } else {
            warn!(
                "the store ignores conditional writes (If-None-Match): no cross-process job leases; \
                 two workers given the same job at the same moment may both pay for it"
            );
        }
        Ok(Self::new(settings, pipeline))
    }
}

//! Cross-process job leases, on stores that honour conditional writes: `lease.json` in the job's
//! directory says which worker holds the job. It is written with `If-None-Match: *`, renewed by a
//! task of its own every third of its lifetime for as long as the worker has the job (waiting for
//! a provider slot, retrying, uploading), and deleted when the job is done. A worker that finds
//! another's live lease defers the job instead of buying it too; a dead worker's lease expires.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio_util::task::AbortOnDropHandle;
use tracing::{info, warn};

use super::Outcome;
use super::events::Progress;
use super::images::conflict;
use super::run::JobRun;

use crate::domain::error::{ErrorKind, Failure};
use crate::domain::keys;
use crate::provider::queued::unix_ms;
use crate::storage::{ObjectStore, PutObject};

impl JobRun<'_> {
    /// Takes the job's lease, when leases are on and images are missing: `Ok` with the guard
    /// (none without leases) and the progress back; `Err` with the job's outcome when it must
    /// not be bought here now (another worker holds it or finished it, or it is poison).
    pub(super) async fn lease(
        &self,
        progress: Progress,
        record_key: &str,
    ) -> Result<(Option<LeaseGuard>, Progress), Outcome> {
        let guard = match &self.p.leases {
            Some(leases) if !progress.missing(self.job.n).is_empty() => {
                match leases.acquire(self.dir).await {
                    Ok(LeaseState::Acquired(guard)) => {
                        // Another worker may have finished the job (and released its lease)
                        // between our first look for the result and the lease: look again, now
                        // that no one else can start buying.
                        if let Ok(Some(event)) = self.p.images.stored_event(record_key).await {
                            guard.release().await;
                            if !self.same_job(&event) {
                                return Err(self.failed(progress, conflict(self.job)));
                            }
                            return Err(
                                self.stored(event, "result stored by another worker meanwhile")
                            );
                        }
                        Some(guard)
                    }
                    Ok(LeaseState::HeldElsewhere(left)) => {
                        info!(
                            left_ms = left.as_millis() as u64,
                            "another worker holds this job: deferring it"
                        );
                        return Err(Outcome::Defer {
                            after: left.max(Duration::from_secs(1)),
                            attempts: progress.prior,
                        });
                    }
                    Ok(LeaseState::Abandoned(deaths)) => {
                        leases.clear(self.dir).await;
                        let failure = Failure::Permanent {
                            kind: ErrorKind::RetriesExhausted,
                            message: format!(
                                "workers died {deaths} times while processing this job: it is treated as poison"
                            ),
                            detail: Default::default(),
                        };
                        return Err(self.failed(progress, failure));
                    }
                    Err(failure) => return Err(self.storage_down(failure)),
                }
            }
            _ => None,
        };
        Ok((guard, progress))
    }
}

/// This worker's leases.
pub struct Leases {
    store: Arc<dyn ObjectStore>,
    owner: String,
    ttl: Duration,
    max_takeovers: u32,
}

#[derive(serde::Serialize, serde::Deserialize)]
struct LeaseBody {
    owner: String,
    expires_unix_ms: u64,
    /// Times a worker found this lease expired under another owner (a worker died on the job).
    #[serde(default)]
    takeovers: u32,
}

/// What the attempt to take a job's lease found.
pub enum LeaseState {
    /// This worker holds the job until the guard is released or dropped.
    Acquired(LeaseGuard),
    /// Another worker's live lease: it runs out after this long.
    HeldElsewhere(Duration),
    /// Workers died on this job this many times: a poison job.
    Abandoned(u32),
}

/// Writes (`only_if_absent`) or renews a lease; false when another lease exists.
async fn write(
    store: &dyn ObjectStore,
    key: &str,
    owner: &str,
    ttl: Duration,
    takeovers: u32,
    only_if_absent: bool,
) -> Result<bool, Failure> {
    let body = LeaseBody {
        owner: owner.to_string(),
        expires_unix_ms: unix_ms() + ttl.as_millis() as u64,
        takeovers,
    };
    let object = PutObject::json(
        key,
        Bytes::from(serde_json::to_vec(&body).unwrap_or_default()),
    );
    let written = if only_if_absent {
        store.put_if_absent(object).await
    } else {
        store.put(object).await.map(|()| true)
    };
    written.map_err(Failure::from)
}

impl Leases {
    pub fn new(
        store: Arc<dyn ObjectStore>,
        owner: String,
        ttl: Duration,
        max_takeovers: u32,
    ) -> Self {
        Self {
            store,
            owner,
            ttl,
            max_takeovers,
        }
    }

    /// Takes the job's lease unless another worker holds a live one.
    pub async fn acquire(&self, job_dir: &str) -> Result<LeaseState, Failure> {
        let key = keys::lease(job_dir);
        if write(&*self.store, &key, &self.owner, self.ttl, 0, true).await? {
            return Ok(LeaseState::Acquired(self.guard(key, 0)));
        }
        let current = self
            .store
            .get(&key)
            .await
            .map_err(Failure::from)?
            .and_then(|b| serde_json::from_slice::<LeaseBody>(&b).ok());
        let now = unix_ms();
        let takeovers = match current {
            Some(l) if l.owner != self.owner && l.expires_unix_ms > now => {
                return Ok(LeaseState::HeldElsewhere(Duration::from_millis(
                    l.expires_unix_ms - now,
                )));
            }
            // Expired under another owner: that worker died (or stalled) on this job.
            Some(l) if l.owner != self.owner => l.takeovers + 1,
            Some(l) => l.takeovers,
            None => 0,
        };
        if takeovers > self.max_takeovers {
            return Ok(LeaseState::Abandoned(takeovers));
        }
        if takeovers > 0 {
            warn!(
                takeovers,
                "taking over the lease of a worker that died on this job"
            );
        }
        write(&*self.store, &key, &self.owner, self.ttl, takeovers, false).await?;
        Ok(LeaseState::Acquired(self.guard(key, takeovers)))
    }

    /// Removes a poison job's lease, so that a replay starts afresh.
    pub async fn clear(&self, job_dir: &str) {
        let _ = self.store.delete(&keys::lease(job_dir)).await;
    }

    fn guard(&self, key: String, takeovers: u32) -> LeaseGuard {
        let (store, owner, ttl) = (self.store.clone(), self.owner.clone(), self.ttl);
        let renewing = key.clone();
        let renewal = tokio::spawn(async move {
            loop {
                tokio::time::sleep(ttl / 3).await;
                if let Err(e) = write(&*store, &renewing, &owner, ttl, takeovers, false).await {
                    warn!(error = %e, "could not renew the job's lease");
                }
            }
        });
        LeaseGuard {
            key,
            store: self.store.clone(),
            renewal: Some(AbortOnDropHandle::new(renewal)),
        }
    }
}

/// A held lease: renewed in its own task until it is released, or dropped (then it is deleted
/// in the background).
pub struct LeaseGuard {
    key: String,
    store: Arc<dyn ObjectStore>,
    renewal: Option<AbortOnDropHandle<()>>,
}

impl LeaseGuard {
    /// Stops renewing and deletes the lease.
    pub async fn release(mut self) {
        self.renewal.take();
        if let Err(e) = self.store.delete(&self.key).await {
            warn!(error = %e, "could not delete the job's lease: it expires by itself");
        }
    }
}

impl Drop for LeaseGuard {
    fn drop(&mut self) {
        if self.renewal.take().is_some() {
            let (store, key) = (self.store.clone(), std::mem::take(&mut self.key));
            tokio::spawn(async move {
                let _ = store.delete(&key).await;
            });
        }
    }
}

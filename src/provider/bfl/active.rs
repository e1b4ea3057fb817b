//! The tasks a worker keeps active at BFL, up to `max_active`: a submit waits for room, and a
//! task leaves when a poll sees it end (or after [`ACTIVE_TTL`] without news of it).

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use tokio::sync::Notify;
use tokio::time::Instant;

/// How long a task this worker submitted counts against `max_active` without news of it
/// (another worker may have finished it): longer than any generation takes.
const ACTIVE_TTL: Duration = Duration::from_secs(15 * 60);

/// The tasks this worker has active at the provider, up to `max_active`: a submit waits for
/// room, and a task leaves when a poll sees it end (or after [`ACTIVE_TTL`] without news, when
/// another worker finished it).
pub(super) struct Active {
    limit: usize,
    tasks: Mutex<HashMap<String, Instant>>,
    freed: Notify,
    next: std::sync::atomic::AtomicU64,
}

/// Room for one task, held from before its submit: dropped without [`bind`](Ticket::bind)
/// (the submit failed), it frees the room.
pub(super) struct Ticket<'a> {
    active: &'a Active,
    key: String,
    bound: std::cell::Cell<bool>,
}

impl Active {
    pub(super) fn new(limit: usize) -> Self {
        Self {
            limit,
            tasks: Mutex::default(),
            freed: Notify::new(),
            next: std::sync::atomic::AtomicU64::new(0),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Instant>> {
        self.tasks
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(super) async fn admit(&self) -> Ticket<'_> {
        loop {
            let freed = self.freed.notified();
            {
                let mut tasks = self.lock();
                let now = Instant::now();
                tasks.retain(|_, since| now.duration_since(*since) < ACTIVE_TTL);
                if tasks.len() < self.limit {
                    let key = format!(
                        "submitting-{}",
                        self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
                    );
                    tasks.insert(key.clone(), now);
                    return Ticket {
                        active: self,
                        key,
                        bound: std::cell::Cell::new(false),
                    };
                }
            }
            // Also wakes now and then, for entries that time out.
            let _ = tokio::time::timeout(Duration::from_secs(5), freed).await;
        }
    }

    pub(super) fn finished(&self, id: &str) {
        if self.lock().remove(id).is_some() {
            self.freed.notify_waiters();
        }
    }
}

impl Ticket<'_> {
    /// The submit was accepted: the room is the task's until it ends.
    pub(super) fn bind(&self, id: &str) {
        let mut tasks = self.active.lock();
        tasks.remove(&self.key);
        tasks.insert(id.to_string(), Instant::now());
        self.bound.set(true);
    }
}

impl Drop for Ticket<'_> {
    fn drop(&mut self) {
        if !self.bound.get() {
            self.active.lock().remove(&self.key);
            self.active.freed.notify_waiters();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_submit_waits_for_room_among_the_active_tasks() {
        let active = Active::new(1);
        let first = active.admit().await;
        first.bind("t1");
        drop(first);
        assert!(
            tokio::time::timeout(Duration::from_millis(50), active.admit())
                .await
                .is_err(),
            "full"
        );
        active.finished("t1");
        let second = tokio::time::timeout(Duration::from_millis(50), active.admit()).await;
        assert!(second.is_ok(), "room once the task ended");
        drop(second);
        // A ticket never bound frees its room.
        assert!(
            tokio::time::timeout(Duration::from_millis(50), active.admit())
                .await
                .is_ok()
        );
    }
}

//! The memory of provider answers: a byte budget, and the image-sized buffers reused within it.
//!
//! Every answer of an image API is hundreds of kilobytes to megabytes of base64, and a worker
//! may have hundreds of calls in flight: if they are answered at the same moment, holding every
//! answer at once would take gigabytes. So an answer is read only once it has a reservation of
//! its bytes in one budget shared by every provider of the worker (`worker.answer_memory_bytes`):
//!
//! - A reservation is taken whole or waited for: an answer never starts with part of its bytes,
//!   so no two answers can each hold half of what the other needs. Waiters are served in
//!   arrival order (the first one gathers the room that frees up; every other holder has all it
//!   needs and gives it back without waiting).
//! - One answer larger than the whole budget takes the whole budget: it proceeds alone.
//! - Until its reservation is granted, an answer waits in the kernel's socket buffers (the caller
//!   does not read its body). The wait is not counted in the request's timeout.
//! - The answer is read into a buffer of this pool, decoded in place and uploaded from there; its
//!   reservation ends when the last reference to its images is dropped.
//! - Request bodies (reference images) take reservations from the same budget ([`Reservation`]).
//!
//! Buffers are reused because allocating a fresh one per answer costs a worker twice: the kernel
//! maps and clears new pages for each, and glibc's heap fragments when such buffers are freed on
//! other threads than the ones that allocated them. An idle buffer keeps its reservation, so the
//! bytes of answers being read or uploaded plus the idle buffers never exceed the budget (bar the
//! one answer larger than it). While answers wait for the budget, a buffer given back hands its
//! reservation to them and its memory to the next one that gets in (an eighth of the budget at
//! most changes hands that way at a time; the rest is freed): a burst of answers then reuses
//! most of the same buffers instead of mapping fresh pages for each. Once no one waits, buffers
//! still changing hands become idle buffers if the budget has room for them (so they hold their
//! reservation again), and are freed otherwise: nothing stays held beyond the budget.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;
use tokio::sync::Semaphore;

/// The budget is kept in units of this many bytes.
const UNIT: usize = 1024;
/// Reservations of at least this many units are rounded up to a multiple of [`COARSE`] units.
const COARSE_FROM: usize = 1024;
const COARSE: usize = 64;

#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<Inner>,
}

struct Inner {
    /// The budget's free units.
    units: Semaphore,
    /// The whole budget, in units.
    total: u32,
    idle: Mutex<Vec<Idle>>,
    /// Buffers given back while reservations waited: their units went to the waiters, their
    /// memory waits here for the next answer that gets in. At most [`Inner::handoff_max`] bytes.
    handoff: Mutex<Vec<Vec<u8>>>,
    /// Reservations waiting for units: while any does, returned buffers are not kept idle.
    waiting: AtomicUsize,
    /// Reservations that had to wait, since the pool was made.
    waits: AtomicU64,
}

/// An idle buffer and the units it holds.
struct Idle {
    buf: Vec<u8>,
    units: u32,
}

impl BufferPool {
    /// A pool whose answers (and idle buffers) hold at most `budget_bytes` at once.
    pub fn new(budget_bytes: usize) -> Self {
        let total = budget_bytes
            .div_ceil(UNIT)
            .clamp(1, (u32::MAX as usize).min(Semaphore::MAX_PERMITS)) as u32;
        Self {
            inner: Arc::new(Inner {
                units: Semaphore::new(total as usize),
                total,
                idle: Mutex::new(Vec::new()),
                handoff: Mutex::new(Vec::new()),
                waiting: AtomicUsize::new(0),
                waits: AtomicU64::new(0),
            }),
        }
    }

    /// A pool with a budget too large to bind (tests, fuzzing, one-off reads).
    pub fn unbounded() -> Self {
        Self::new(usize::MAX)
    }

    /// The budget, in bytes.
    pub fn budget(&self) -> usize {
        self.inner.total as usize * UNIT
    }

    /// The units of `bytes`, clamped to the whole budget (one answer may always proceed alone).
    /// Reservations of a mebibyte or more are rounded up to 64 KiB, so that answers a few bytes
    /// apart (images of one size) take the same room and can reuse each other's buffers.
    fn units_of(&self, bytes: usize) -> u32 {
        let units = bytes.div_ceil(UNIT);
        let units = if units >= COARSE_FROM {
            units.next_multiple_of(COARSE)
        } else {
            units
        };
        units.clamp(1, self.inner.total as usize) as u32
    }

    /// An empty buffer for an answer of `bytes` bytes, once the budget has room for them: an idle
    /// buffer big enough when there is one (at once: it holds its reservation), else a new one.
    /// Waits, in arrival order, while the budget is held by other answers.
    pub async fn take(&self, bytes: usize) -> PooledBuf {
        if let Some(buf) = self.try_take(bytes) {
            return buf;
        }
        let units = self.units_of(bytes);
        self.wait_for(units).await;
        self.new_buf(bytes, units)
    }

    /// Waits, in arrival order, until `units` of the budget are this caller's.
    async fn wait_for(&self, units: u32) {
        let _waiting = Waiting::new(&self.inner);
        // Idle buffers hold units that a waiter needs: after `Waiting` is counted no buffer is
        // kept, and those already idle are handed over now.
        self.free_idle(usize::MAX);
        self.inner
            .units
            .acquire_many(units)
            .await
            .expect("the budget's semaphore is never closed")
            .forget();
    }

    /// [`take`](Self::take) without waiting: `None` when the budget has no room now.
    pub fn try_take(&self, bytes: usize) -> Option<PooledBuf> {
        if let Some(idle) = self.reuse(bytes) {
            return Some(PooledBuf {
                buf: idle.buf,
                units: idle.units,
                pool: Some(self.inner.clone()),
            });
        }
        let units = self.units_of(bytes);
        loop {
            if let Ok(permit) = self.inner.units.try_acquire_many(units) {
                permit.forget();
                return Some(self.new_buf(bytes, units));
            }
            // The room may be held by idle buffers too small for this answer: free one, retry.
            if !self.free_idle(1) {
                return None;
            }
        }
    }

    /// Reserves `bytes` of the budget for bytes held elsewhere (a request body being sent),
    /// all or nothing, waiting in arrival order like [`take`](Self::take).
    pub async fn reserve(&self, bytes: usize) -> Reservation {
        let units = self.units_of(bytes);
        match self.inner.units.try_acquire_many(units) {
            Ok(permit) => permit.forget(),
            Err(_) => self.wait_for(units).await,
        }
        Reservation {
            units,
            pool: self.inner.clone(),
        }
    }

    fn new_buf(&self, bytes: usize, units: u32) -> PooledBuf {
        let room = units as usize * UNIT;
        let handed = {
            let mut handoff = self.inner.lock_handoff();
            let fits = (0..handoff.len())
                .filter(|&i| (bytes..=room).contains(&handoff[i].capacity()))
                .min_by_key(|&i| handoff[i].capacity());
            fits.map(|i| handoff.swap_remove(i))
        };
        self.inner.settle_handoff();
        PooledBuf {
            // The whole reservation, so that the buffer fits any later answer of as many units;
            // an answer larger than the whole budget grows it as it arrives.
            buf: handed.unwrap_or_else(|| Vec::with_capacity(room)),
            units,
            pool: Some(self.inner.clone()),
        }
    }

    /// The smallest idle buffer with room for `bytes`.
    fn reuse(&self, bytes: usize) -> Option<Idle> {
        let mut idle = self.inner.lock_idle();
        let i = (0..idle.len())
            .filter(|&i| idle[i].buf.capacity() >= bytes)
            .min_by_key(|&i| idle[i].buf.capacity())?;
        Some(idle.swap_remove(i))
    }

    /// Frees up to `n` idle buffers, smallest first, giving their units back. Whether any was.
    fn free_idle(&self, n: usize) -> bool {
        let freed: Vec<Idle> = {
            let mut idle = self.inner.lock_idle();
            idle.sort_unstable_by_key(|i| std::cmp::Reverse(i.buf.capacity()));
            let keep = idle.len().saturating_sub(n);
            idle.drain(keep..).collect()
        };
        let any = !freed.is_empty();
        for idle in freed {
            self.inner.hand_over(idle.buf, idle.units);
        }
        any
    }

    /// Idle buffers held now.
    pub fn idle(&self) -> usize {
        self.inner.lock_idle().len()
    }

    /// Bytes of the budget held now, by answers, request bodies and idle buffers.
    pub fn held(&self) -> usize {
        (self.inner.total as usize - self.inner.units.available_permits()) * UNIT
    }

    /// Reservations that had to wait for room, since the pool was made.
    pub fn waits(&self) -> u64 {
        self.inner.waits.load(Ordering::Relaxed)
    }

    /// Bytes of the budget held by idle buffers.
    pub fn idle_bytes(&self) -> usize {
        self.inner
            .lock_idle()
            .iter()
            .map(|i| i.units as usize * UNIT)
            .sum()
    }
}

impl Inner {
    fn lock_idle(&self) -> MutexGuard<'_, Vec<Idle>> {
        self.idle.lock().unwrap_or_else(PoisonError::into_inner)
    }

    fn lock_handoff(&self) -> MutexGuard<'_, Vec<Vec<u8>>> {
        self.handoff.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The most bytes of buffers changing hands at once: what may be held beyond the budget
    /// while answers wait. (Half the budget let more of a burst's answers reuse memory, about
    /// 27 fresh pages per 2 MB answer instead of 100, for no CPU the benchmark could see.)
    fn handoff_max(&self) -> usize {
        self.total as usize * UNIT / 8
    }

    /// Once no reservation waits, the buffers left changing hands become idle buffers where the
    /// budget has room for them (they hold their reservation again), and are freed otherwise.
    fn settle_handoff(&self) {
        if self.waiting.load(Ordering::SeqCst) > 0 {
            return;
        }
        let left = std::mem::take(&mut *self.lock_handoff());
        for buf in left {
            let units = buf.capacity().div_ceil(UNIT).clamp(1, self.total as usize) as u32;
            match self.units.try_acquire_many(units) {
                Ok(permit) => {
                    permit.forget();
                    self.lock_idle().push(Idle { buf, units });
                }
                Err(_) => drop(buf),
            }
        }
        // A reservation that started waiting meanwhile must not wait for these.
        if self.waiting.load(Ordering::SeqCst) > 0 {
            self.hand_idle_over();
        }
    }

    /// Hands every idle buffer over to the reservations that wait.
    fn hand_idle_over(&self) {
        let idle: Vec<Idle> = std::mem::take(&mut *self.lock_idle());
        for idle in idle {
            self.hand_over(idle.buf, idle.units);
        }
    }

    /// Gives `units` back to the budget, and `buf`'s memory to the next answer that gets in when
    /// there is room for it among the buffers changing hands (else it is freed).
    fn hand_over(&self, buf: Vec<u8>, units: u32) {
        {
            let mut handoff = self.lock_handoff();
            let held: usize = handoff.iter().map(Vec::capacity).sum();
            if held + buf.capacity() <= self.handoff_max() {
                handoff.push(buf);
            } else if let Some(i) = (0..handoff.len())
                .filter(|&i| handoff[i].capacity() < buf.capacity())
                .min_by_key(|&i| handoff[i].capacity())
                .filter(|&i| held - handoff[i].capacity() + buf.capacity() <= self.handoff_max())
            {
                // A bigger buffer is worth more to the next answer than a smaller one.
                handoff[i] = buf;
            }
        }
        self.units.add_permits(units as usize);
    }
}

/// Counts a waiting reservation for as long as it waits (a cancelled wait included).
struct Waiting<'a>(&'a AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(inner: &'a Inner) -> Self {
        inner.waits.fetch_add(1, Ordering::Relaxed);
        inner.waiting.fetch_add(1, Ordering::SeqCst);
        Self(&inner.waiting)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

/// Part of the budget held for bytes that live elsewhere; given back when dropped.
pub struct Reservation {
    units: u32,
    pool: Arc<Inner>,
}

impl Reservation {
    /// The bytes reserved.
    pub fn bytes(&self) -> usize {
        self.units as usize * UNIT
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.pool.units.add_permits(self.units as usize);
    }
}

/// A buffer that goes back to its pool, with its reservation, when dropped. `freeze` turns it
/// into `Bytes` that do the same when their last clone is dropped.
pub struct PooledBuf {
    buf: Vec<u8>,
    /// The budget's units this buffer holds.
    units: u32,
    pool: Option<Arc<Inner>>,
}

impl PooledBuf {
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
    }

    /// The bytes of the budget this buffer holds: what it may grow to and stay within the
    /// budget (an answer larger than the whole budget grows past it, alone).
    pub fn reserved(&self) -> usize {
        self.units as usize * UNIT
    }
}

impl std::ops::Deref for PooledBuf {
    type Target = Vec<u8>;
    fn deref(&self) -> &Vec<u8> {
        &self.buf
    }
}

impl std::ops::DerefMut for PooledBuf {
    fn deref_mut(&mut self) -> &mut Vec<u8> {
        &mut self.buf
    }
}

impl AsRef<[u8]> for PooledBuf {
    fn as_ref(&self) -> &[u8] {
        &self.buf
    }
}

impl Drop for PooledBuf {
    fn drop(&mut self) {
        let Some(pool) = self.pool.take() else { return };
        let mut buf = std::mem::take(&mut self.buf);
        buf.clear();
        // Kept only within its own reservation, and only while no one waits for the budget.
        let keep = buf.capacity() > 0
            && buf.capacity() <= self.units as usize * UNIT
            && pool.waiting.load(Ordering::SeqCst) == 0;
        if keep {
            pool.lock_idle().push(Idle {
                buf,
                units: self.units,
            });
            // A reservation that started waiting meanwhile must not wait for this one.
            if pool.waiting.load(Ordering::SeqCst) > 0 {
                pool.hand_idle_over();
            } else {
                pool.settle_handoff();
            }
        } else if buf.capacity() <= self.units as usize * UNIT {
            pool.hand_over(buf, self.units);
        } else {
            drop(buf);
            pool.units.add_permits(self.units as usize);
        }
    }
}

#[cfg(test)]
mod tests;

//! Image-sized buffers reused from one job to the next.
//!
//! Every answer of an image API is hundreds of kilobytes to megabytes of base64. Allocating a
//! fresh buffer per answer costs a worker twice: the kernel maps and clears new pages for each
//! one, and glibc's heap fragments when such buffers are freed on other threads than the ones
//! that allocated them, so the peak creeps up with the number of jobs. A small pool avoids both:
//! an answer is read into a buffer taken from the pool, decoded in place, uploaded from there,
//! and the buffer goes back to the pool when the last reference to the image is dropped.
//!
//! The pool never holds more buffers than were in use at the same time, and at most `keep` of
//! them: its memory is bounded by `keep x` the largest answer accepted
//! (`provider.max_response_bytes`).

use std::sync::{Arc, Mutex};

use bytes::Bytes;

#[derive(Clone)]
pub struct BufferPool {
    inner: Arc<Inner>,
}

struct Inner {
    free: Mutex<Vec<Vec<u8>>>,
    keep: usize,
}

impl BufferPool {
    /// A pool keeping at most `keep` idle buffers (0 disables reuse).
    pub fn new(keep: usize) -> Self {
        Self {
            inner: Arc::new(Inner {
                free: Mutex::new(Vec::with_capacity(keep)),
                keep,
            }),
        }
    }

    /// An empty buffer with room for at least `capacity` bytes: the most recently returned one
    /// when it is big enough, a new one otherwise.
    pub fn take(&self, capacity: usize) -> PooledBuf {
        let reused = {
            let mut free = self.inner.free.lock().unwrap_or_else(|e| e.into_inner());
            match free.iter().rposition(|b| b.capacity() >= capacity) {
                Some(i) => Some(free.swap_remove(i)),
                None => {
                    // The smallest idle buffer is too small for the answers coming now: it makes
                    // room for one that is not.
                    if let Some(i) = (0..free.len()).min_by_key(|&i| free[i].capacity()) {
                        drop(free.swap_remove(i));
                    }
                    None
                }
            }
        };
        PooledBuf {
            buf: reused.unwrap_or_else(|| Vec::with_capacity(capacity)),
            pool: Some(self.inner.clone()),
        }
    }

    /// Idle buffers held now.
    pub fn idle(&self) -> usize {
        self.inner
            .free
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .len()
    }
}

/// A buffer that goes back to its pool when dropped. `freeze` turns it into `Bytes` that do
/// the same when their last clone is dropped.
pub struct PooledBuf {
    buf: Vec<u8>,
    pool: Option<Arc<Inner>>,
}

impl PooledBuf {
    pub fn freeze(self) -> Bytes {
        Bytes::from_owner(self)
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
        let mut free = pool.free.lock().unwrap_or_else(|e| e.into_inner());
        if free.len() < pool.keep && buf.capacity() > 0 {
            free.push(buf);
        }
        // Otherwise `buf` is freed here, after the lock (locals drop in reverse order).
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dropped_image_gives_its_buffer_back_for_the_next_answer() {
        let pool = BufferPool::new(2);
        let mut buf = pool.take(1000);
        buf.extend_from_slice(b"hello world");
        let first = buf.as_ptr();
        let bytes = buf.freeze();
        let image = bytes.slice(6..);
        drop(bytes);
        assert_eq!(pool.idle(), 0, "a slice still holds the buffer");
        assert_eq!(&image[..], b"world");
        drop(image);
        assert_eq!(pool.idle(), 1);
        let again = pool.take(500);
        assert!(again.is_empty());
        assert_eq!(again.as_ptr(), first, "the same allocation is reused");
        assert_eq!(pool.idle(), 0);
    }

    #[test]
    fn too_small_buffers_are_not_reused_and_the_pool_keeps_at_most_keep() {
        let pool = BufferPool::new(2);
        let small = pool.take(10);
        drop(small);
        assert_eq!(pool.idle(), 1);
        let big = pool.take(4096);
        assert!(big.capacity() >= 4096);
        assert_eq!(pool.idle(), 0, "the idle one was too small: it is freed");
        let others: Vec<_> = (0..3).map(|_| pool.take(4096)).collect();
        drop(big);
        drop(others);
        assert_eq!(pool.idle(), 2);
        assert!(BufferPool::new(0).take(1).capacity() >= 1);
        let none = BufferPool::new(0);
        drop(none.take(8));
        assert_eq!(none.idle(), 0);
    }
}

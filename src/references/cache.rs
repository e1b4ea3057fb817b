//! The reference images a worker has read, shared by every job that uses them: bounded in bytes,
//! filled once per key however many jobs miss it at once (single flight), and shared by content
//! (two keys or URLs of the same bytes hold one image, and one encoded form of it).

use std::collections::{HashMap, VecDeque};
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tokio::sync::OnceCell;

use super::{RefImage, Unresolved};

type Cell = Arc<OnceCell<(Arc<RefImage>, Instant)>>;

#[derive(Default)]
struct Inner {
    cells: HashMap<String, Cell>,
    /// Keys of filled cells, oldest first (evicted first).
    order: VecDeque<String>,
    /// Bytes of the filled cells' images.
    bytes: usize,
    /// Images by their SHA-256, while any job holds them.
    by_content: HashMap<String, Weak<RefImage>>,
}

pub struct Cache {
    max_bytes: usize,
    ttl: Duration,
    inner: Mutex<Inner>,
}

impl Cache {
    /// `max_bytes`: the most the cached images hold (an image larger than it is read for each
    /// use); `ttl`: how long an image read from a URL is used before it is read again.
    pub fn new(max_bytes: usize, ttl: Duration) -> Self {
        Self {
            max_bytes,
            ttl,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The image under `key`, read by `load` when it is not cached (or older than the TTL,
    /// when `expires`). Concurrent misses of one key wait for one `load`.
    pub async fn get<F, Fut>(
        &self,
        key: &str,
        expires: bool,
        load: F,
    ) -> Result<Arc<RefImage>, Unresolved>
    where
        F: FnOnce() -> Fut,
        Fut: Future<Output = Result<RefImage, Unresolved>>,
    {
        let cell = {
            let mut inner = self.lock();
            let stale = inner
                .cells
                .get(key)
                .is_some_and(|c| expires && c.get().is_some_and(|(_, at)| at.elapsed() > self.ttl));
            if stale {
                Self::remove(&mut inner, key);
            }
            inner.cells.entry(key.to_string()).or_default().clone()
        };
        let mut loaded = false;
        let result = cell
            .get_or_try_init(|| async {
                loaded = true;
                let image = load().await?;
                Ok::<_, Unresolved>((self.shared(image), Instant::now()))
            })
            .await;
        match result {
            Ok((image, _)) => {
                let image = image.clone();
                if loaded {
                    self.filled(key, &cell, image.data.len());
                }
                Ok(image)
            }
            Err(e) => {
                // Not kept: the next use reads it again.
                let mut inner = self.lock();
                if inner
                    .cells
                    .get(key)
                    .is_some_and(|c| Arc::ptr_eq(c, &cell) && c.get().is_none())
                {
                    inner.cells.remove(key);
                }
                Err(e)
            }
        }
    }

    /// The image already held for the same bytes, if any job still holds one.
    fn shared(&self, image: RefImage) -> Arc<RefImage> {
        let mut inner = self.lock();
        if let Some(existing) = inner.by_content.get(&image.sha256).and_then(Weak::upgrade) {
            return existing;
        }
        let image = Arc::new(image);
        inner.by_content.retain(|_, w| w.strong_count() > 0);
        inner
            .by_content
            .insert(image.sha256.clone(), Arc::downgrade(&image));
        image
    }

    /// A cell was filled: it counts against the bound; the oldest go until it holds.
    fn filled(&self, key: &str, cell: &Cell, bytes: usize) {
        let mut inner = self.lock();
        if !inner.cells.get(key).is_some_and(|c| Arc::ptr_eq(c, cell)) {
            return;
        }
        if bytes > self.max_bytes {
            inner.cells.remove(key);
            return;
        }
        inner.order.push_back(key.to_string());
        inner.bytes += bytes;
        while inner.bytes > self.max_bytes {
            let Some(oldest) = inner.order.front().cloned() else {
                break;
            };
            Self::remove(&mut inner, &oldest);
        }
    }

    fn remove(inner: &mut Inner, key: &str) {
        if let Some(cell) = inner.cells.remove(key)
            && let Some((image, _)) = cell.get()
        {
            inner.bytes = inner.bytes.saturating_sub(image.data.len());
            inner.order.retain(|k| k != key);
        }
    }

    /// Bytes held now.
    pub fn bytes(&self) -> usize {
        self.lock().bytes
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    fn image(fill: u8, len: usize) -> RefImage {
        RefImage::from_checked(
            bytes::Bytes::from(vec![fill; len]),
            "image/png",
            "png",
            1,
            1,
            false,
        )
    }

    #[tokio::test]
    async fn concurrent_misses_of_one_key_make_one_load() {
        let cache = Arc::new(Cache::new(1 << 20, Duration::from_secs(60)));
        let loads = Arc::new(AtomicUsize::new(0));
        let uses: Vec<_> = (0..256)
            .map(|_| {
                let (cache, loads) = (cache.clone(), loads.clone());
                tokio::spawn(async move {
                    cache
                        .get("k", false, || async {
                            loads.fetch_add(1, Ordering::SeqCst);
                            tokio::time::sleep(Duration::from_millis(50)).await;
                            Ok(image(1, 1000))
                        })
                        .await
                        .unwrap()
                })
            })
            .collect();
        let mut first = None;
        for u in uses {
            let got = u.await.unwrap();
            let same = first.get_or_insert_with(|| got.clone());
            assert!(Arc::ptr_eq(same, &got), "one image shared by all");
        }
        assert_eq!(loads.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn the_bound_evicts_the_oldest_and_failures_are_not_kept() {
        let cache = Cache::new(2500, Duration::from_secs(60));
        for (key, fill) in [("a", 1), ("b", 2), ("c", 3)] {
            cache
                .get(key, false, || async move { Ok(image(fill, 1000)) })
                .await
                .unwrap();
        }
        assert_eq!(cache.bytes(), 2000, "a went");
        let loads = AtomicUsize::new(0);
        let again = |fill| {
            let loads = &loads;
            async move {
                loads.fetch_add(1, Ordering::SeqCst);
                Ok(image(fill, 1000))
            }
        };
        cache.get("c", false, || again(3)).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 0, "c is cached");
        cache.get("a", false, || again(1)).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 1, "a was read again");
        let failed = cache
            .get("x", false, || async {
                Err(Unresolved::Invalid("no".into()))
            })
            .await;
        assert!(failed.is_err());
        cache.get("x", false, || again(4)).await.unwrap();
        assert_eq!(loads.load(Ordering::SeqCst), 2, "a failure is not cached");
        // Larger than the bound: read, used, not kept.
        cache
            .get("big", false, || async { Ok(image(5, 5000)) })
            .await
            .unwrap();
        assert!(cache.bytes() <= 2500);
    }

    #[tokio::test]
    async fn the_same_bytes_under_two_keys_are_one_image() {
        let cache = Cache::new(1 << 20, Duration::from_secs(60));
        let a = cache
            .get("a", false, || async { Ok(image(7, 100)) })
            .await
            .unwrap();
        let b = cache
            .get("b", false, || async { Ok(image(7, 100)) })
            .await
            .unwrap();
        assert!(Arc::ptr_eq(&a, &b));
    }
}

//! The spool: images that were generated (and paid for) but could not be uploaded wait here, on
//! local disk, until storage is back. A later delivery of the job, on this host, even after a
//! restart, uploads them instead of buying them again.
//!
//! Files mirror object keys (`{spool.dir}/{key}`); the spool is capped at `spool.max_bytes`. An
//! image that does not fit is lost and, if the job runs again, regenerated: that is logged and
//! counted. On Kubernetes, mount a volume at `spool.dir`: an `emptyDir` survives container
//! restarts in the same pod but not the pod's deletion; a PersistentVolume survives both.

use std::sync::atomic::{AtomicU64, Ordering};

use bytes::Bytes;

use crate::storage::fs::FsStore;
use crate::storage::{ObjectStore, PutObject, StorageError};

pub struct Spool {
    files: FsStore,
    max_bytes: u64,
    used: AtomicU64,
}

/// An image waiting in the spool.
pub struct Spooled {
    pub key: String,
    pub data: Bytes,
}

impl Spool {
    pub fn open(dir: &std::path::Path, max_bytes: u64) -> std::io::Result<Self> {
        let files = FsStore::new(dir)?;
        let used = dir_size(std::path::Path::new(files.location()));
        Ok(Self {
            files,
            max_bytes,
            used: AtomicU64::new(used),
        })
    }

    /// Keeps an image; false when the spool is full (or the disk fails).
    pub async fn keep(&self, key: &str, data: Bytes) -> bool {
        let size = data.len() as u64;
        let before = self.used.fetch_add(size, Ordering::SeqCst);
        if before + size > self.max_bytes {
            self.used.fetch_sub(size, Ordering::SeqCst);
            return false;
        }
        let put = PutObject::new(key, data, "application/octet-stream");
        if self.files.put(put).await.is_err() {
            self.used.fetch_sub(size, Ordering::SeqCst);
            return false;
        }
        true
    }

    /// The images spooled under a job's key directory.
    pub async fn take_list(&self, dir: &str) -> Result<Vec<Spooled>, StorageError> {
        let mut out = Vec::new();
        // Asked for every job, and almost always about a directory that does not exist: one
        // stat of a local path answers that without a trip through the blocking thread pool.
        // (Another worker process may share the spool, so the disk is asked, not an index.)
        if let Some(path) = self.files.local_path(dir)
            && matches!(std::fs::exists(&path), Ok(false))
        {
            return Ok(out);
        }
        for key in crate::storage::list_all(&self.files, &format!("{dir}/"), None).await? {
            if let Some(data) = self.files.get(&key).await? {
                out.push(Spooled { key, data });
            }
        }
        Ok(out)
    }

    /// Forgets an image once it is stored.
    pub async fn remove(&self, key: &str, size: u64) {
        if self.files.delete(key).await.is_ok() {
            self.used
                .fetch_sub(size.min(self.used.load(Ordering::SeqCst)), Ordering::SeqCst);
        }
    }

    pub fn used_bytes(&self) -> u64 {
        self.used.load(Ordering::SeqCst)
    }
}

fn dir_size(dir: &std::path::Path) -> u64 {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    entries
        .flatten()
        .map(|e| match e.file_type() {
            Ok(t) if t.is_dir() => dir_size(&e.path()),
            Ok(_) => e.metadata().map(|m| m.len()).unwrap_or(0),
            Err(_) => 0,
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn keeps_lists_and_removes_within_its_cap() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path(), 10).unwrap();
        assert!(
            spool
                .keep("images/_/j/0.png", Bytes::from_static(b"123456"))
                .await
        );
        assert!(
            !spool
                .keep("images/_/j/1.png", Bytes::from_static(b"123456"))
                .await,
            "over the cap"
        );
        assert_eq!(spool.used_bytes(), 6);
        let listed = spool.take_list("images/_/j").await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].key, "images/_/j/0.png");
        // A restart finds what was spooled.
        let reopened = Spool::open(dir.path(), 10).unwrap();
        assert_eq!(reopened.used_bytes(), 6);
        reopened.remove("images/_/j/0.png", 6).await;
        assert_eq!(reopened.used_bytes(), 0);
        assert!(reopened.take_list("images/_/j").await.unwrap().is_empty());
    }
}

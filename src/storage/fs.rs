//! `fs` storage: objects are files under a root directory, written atomically (a temporary file
//! in the same directory, then a rename), so a reader never sees half an image.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{ListPage, ObjectInfo, ObjectStore, PutObject, StorageError, StorageErrorKind};

/// A file-system error as a storage error of the matching kind.
fn io_error(op: &'static str, key: &str, e: std::io::Error) -> StorageError {
    let kind = match e.kind() {
        ErrorKind::PermissionDenied | ErrorKind::ReadOnlyFilesystem => StorageErrorKind::Denied,
        ErrorKind::NotFound => StorageErrorKind::NotFound,
        ErrorKind::InvalidInput | ErrorKind::InvalidFilename => StorageErrorKind::Invalid,
        _ => StorageErrorKind::Unavailable,
    };
    StorageError {
        op,
        key: key.into(),
        kind,
        message: e.to_string(),
    }
}

pub struct FsStore {
    root: PathBuf,
    location: String,
}

impl FsStore {
    pub fn new(root: &Path) -> std::io::Result<Self> {
        std::fs::create_dir_all(root)?;
        let root = std::fs::canonicalize(root)?;
        Ok(Self {
            location: root.display().to_string(),
            root,
        })
    }

    fn path(&self, op: &'static str, key: &str) -> Result<PathBuf, StorageError> {
        let relative = Path::new(key);
        if key.is_empty()
            || !relative
                .components()
                .all(|c| matches!(c, Component::Normal(_)))
        {
            return Err(StorageError {
                op,
                key: key.into(),
                kind: StorageErrorKind::Invalid,
                message: "key must be a relative path without `..`".into(),
            });
        }
        Ok(self.root.join(relative))
    }

    async fn write(&self, object: PutObject<'_>) -> Result<(), StorageError> {
        let path = self.path("put", object.key)?;
        let err = |e: std::io::Error| io_error("put", object.key, e);
        let dir = path.parent().unwrap_or(&self.root);
        tokio::fs::create_dir_all(dir).await.map_err(err)?;
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object");
        let tmp = dir.join(format!(".{name}.tmp-{:016x}", fastrand::u64(..)));
        if let Err(e) = tokio::fs::write(&tmp, &object.data).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(err(e));
        }
        tokio::fs::rename(&tmp, &path).await.map_err(err)
    }
}

impl ObjectStore for FsStore {
    fn put<'a>(&'a self, object: PutObject<'a>) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(self.write(object))
    }

    fn put_if_absent<'a>(
        &'a self,
        object: PutObject<'a>,
    ) -> BoxFuture<'a, Result<bool, StorageError>> {
        Box::pin(async move {
            let path = self.path("put", object.key)?;
            let err = |e: std::io::Error| io_error("put", object.key, e);
            if let Some(dir) = path.parent() {
                tokio::fs::create_dir_all(dir).await.map_err(err)?;
            }
            // Written whole to a temporary file, then hard-linked into place: the link fails if
            // the name exists, so exactly one writer wins and no reader sees a partial file.
            let dir = path.parent().unwrap_or(&self.root);
            let tmp = dir.join(format!(".put-if-absent.tmp-{:016x}", fastrand::u64(..)));
            tokio::fs::write(&tmp, &object.data).await.map_err(err)?;
            let linked = tokio::fs::hard_link(&tmp, &path).await;
            let _ = tokio::fs::remove_file(&tmp).await;
            match linked {
                Ok(()) => Ok(true),
                Err(e) if e.kind() == ErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(err(e)),
            }
        })
    }

    fn delete<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<(), StorageError>> {
        Box::pin(async move {
            let path = self.path("delete", key)?;
            match tokio::fs::remove_file(path).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_error("delete", key, e)),
            }
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>> {
        Box::pin(async move {
            let path = self.path("get", key)?;
            match tokio::fs::read(&path).await {
                Ok(data) => Ok(Some(Bytes::from(data))),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_error("get", key, e)),
            }
        })
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StorageError>> {
        Box::pin(async move {
            let path = self.path("head", key)?;
            match tokio::fs::metadata(&path).await {
                Ok(m) => Ok(Some(ObjectInfo {
                    size: m.len(),
                    content_type: None,
                    sha256: None,
                    // A directory keeps no metadata: only result records carry fingerprints here.
                    fingerprint: None,
                })),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_error("head", key, e)),
            }
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxFuture<'a, Result<ListPage, StorageError>> {
        Box::pin(async move {
            // Prefixes used here always end at a directory boundary ("images/b/job/"). Like S3
            // without a delimiter, the listing is recursive.
            let dir_key = prefix.trim_end_matches('/');
            let mut keys = Vec::new();
            let mut pending = vec![(self.path("list", dir_key)?, dir_key.to_string())];
            while let Some((dir, key)) = pending.pop() {
                let mut entries = match tokio::fs::read_dir(&dir).await {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error("list", prefix, e)),
                };
                while let Ok(Some(entry)) = entries.next_entry().await {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with('.') {
                        continue; // files being written, probes
                    }
                    match entry.file_type().await {
                        Ok(t) if t.is_file() => keys.push(format!("{key}/{name}")),
                        Ok(t) if t.is_dir() => {
                            pending.push((entry.path(), format!("{key}/{name}")))
                        }
                        _ => {}
                    }
                }
            }
            keys.sort();
            if let Some(after) = start_after {
                keys.retain(|k| k.as_str() > after);
            }
            let truncated = keys.len() > super::LIST_PAGE;
            keys.truncate(super::LIST_PAGE);
            Ok(ListPage { keys, truncated })
        })
    }

    fn local_path(&self, key: &str) -> Option<PathBuf> {
        self.path("path", key).ok()
    }

    fn check(&self) -> BoxFuture<'_, Result<(), StorageError>> {
        Box::pin(async move {
            let probe = self
                .root
                .join(format!(".imagegen-check-{:016x}", fastrand::u64(..)));
            let result = tokio::fs::write(&probe, b"ok").await;
            let _ = tokio::fs::remove_file(&probe).await;
            result.map_err(|e| {
                let mut error = io_error("check", &self.location, e);
                error.message = format!("storage.root is not writable: {}", error.message);
                error
            })
        })
    }

    fn location(&self) -> &str {
        &self.location
    }

    fn uri(&self, key: &str) -> String {
        format!("file://{}", self.root.join(key).display())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A store in a directory of its own (which lives as long as the guard).
    pub(super) fn store() -> (tempfile::TempDir, FsStore) {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
        (dir, store)
    }

    #[tokio::test]
    async fn writes_reads_lists_and_refuses_escaping_keys() {
        let (_dir, store) = store();
        store.check().await.unwrap();
        let put = |key: &'static str| PutObject {
            key,
            data: Bytes::from_static(b"png"),
            content_type: "image/png",
            metadata: &[],
            sha256: None,
        };
        store.put(put("images/_/j1/0.png")).await.unwrap();
        store.put(put("images/_/j1/1.png")).await.unwrap();
        assert_eq!(
            store.get("images/_/j1/0.png").await.unwrap().unwrap(),
            Bytes::from_static(b"png")
        );
        assert_eq!(store.get("images/_/j1/9.png").await.unwrap(), None);
        assert_eq!(
            store.head("images/_/j1/1.png").await.unwrap().unwrap().size,
            3
        );
        assert_eq!(
            store.list("images/_/j1/", None).await.unwrap(),
            ListPage {
                keys: vec![
                    "images/_/j1/0.png".to_string(),
                    "images/_/j1/1.png".to_string()
                ],
                truncated: false
            }
        );
        assert!(
            store
                .list("images/_/none/", None)
                .await
                .unwrap()
                .keys
                .is_empty()
        );
        let escape = store.put(put("../escape.png")).await.unwrap_err();
        assert_eq!(escape.kind, StorageErrorKind::Invalid);
        assert!(store.put(put("/abs.png")).await.is_err());
        assert!(store.uri("images/_/j1/0.png").starts_with("file:///"));
    }
}

#[cfg(test)]
mod listing_tests {
    use super::*;

    #[tokio::test]
    async fn a_listing_longer_than_a_page_says_so_and_pages_on() {
        let (_dir, store) = tests::store();
        let many = super::super::LIST_PAGE + 5;
        for i in 0..many {
            let key = format!("spend/b/{i:05}");
            store
                .put(PutObject::new(
                    &key,
                    Bytes::new(),
                    "application/octet-stream",
                ))
                .await
                .unwrap();
        }
        let first = store.list("spend/b/", None).await.unwrap();
        assert!(first.truncated);
        assert_eq!(first.keys.len(), super::super::LIST_PAGE);
        let all = super::super::list_all(&store, "spend/b/", None)
            .await
            .unwrap();
        assert_eq!(all.len(), many);
        assert_eq!(all.last().map(String::as_str), Some("spend/b/01004"));
    }

    #[test]
    fn a_directory_the_worker_may_not_write_is_denied_not_unavailable() {
        let e = io_error(
            "put",
            "k",
            std::io::Error::from(ErrorKind::PermissionDenied),
        );
        assert_eq!(e.kind, StorageErrorKind::Denied);
        assert!(matches!(
            crate::domain::error::Failure::from(e),
            crate::domain::error::Failure::Stop { .. }
        ));
        let e = io_error("put", "k", std::io::Error::from(ErrorKind::TimedOut));
        assert!(crate::domain::error::Failure::from(e).is_retryable());
    }
}

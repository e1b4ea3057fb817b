//! `fs` storage: objects are files under a root directory, written atomically (a temporary file
//! in the same directory, then a rename), so a reader never sees half an image.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{ObjectInfo, ObjectStore, PutObject, StorageError};

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
                message: "key must be a relative path without `..`".into(),
            });
        }
        Ok(self.root.join(relative))
    }

    async fn write(&self, object: PutObject<'_>) -> Result<(), StorageError> {
        let path = self.path("put", object.key)?;
        let err = |e: std::io::Error| StorageError {
            op: "put",
            key: object.key.into(),
            message: e.to_string(),
        };
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
            let err = |e: std::io::Error| StorageError {
                op: "put",
                key: object.key.into(),
                message: e.to_string(),
            };
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
                Err(e) => Err(StorageError {
                    op: "delete",
                    key: key.into(),
                    message: e.to_string(),
                }),
            }
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>> {
        Box::pin(async move {
            let path = self.path("get", key)?;
            match tokio::fs::read(&path).await {
                Ok(data) => Ok(Some(Bytes::from(data))),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StorageError {
                    op: "get",
                    key: key.into(),
                    message: e.to_string(),
                }),
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
                })),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(StorageError {
                    op: "head",
                    key: key.into(),
                    message: e.to_string(),
                }),
            }
        })
    }

    fn list<'a>(
        &'a self,
        prefix: &'a str,
        start_after: Option<&'a str>,
    ) -> BoxFuture<'a, Result<Vec<String>, StorageError>> {
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
                    Err(e) => {
                        return Err(StorageError {
                            op: "list",
                            key: prefix.into(),
                            message: e.to_string(),
                        });
                    }
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
            keys.truncate(super::LIST_PAGE);
            Ok(keys)
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
            result.map_err(|e| StorageError {
                op: "check",
                key: self.location.clone(),
                message: format!("storage.root is not writable: {e}"),
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

    #[tokio::test]
    async fn writes_reads_lists_and_refuses_escaping_keys() {
        let dir = tempfile::tempdir().unwrap();
        let store = FsStore::new(dir.path()).unwrap();
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
            vec![
                "images/_/j1/0.png".to_string(),
                "images/_/j1/1.png".to_string()
            ]
        );
        assert!(store.list("images/_/none/", None).await.unwrap().is_empty());
        assert!(store.put(put("../escape.png")).await.is_err());
        assert!(store.put(put("/abs.png")).await.is_err());
        assert!(store.uri("images/_/j1/0.png").starts_with("file:///"));
    }
}

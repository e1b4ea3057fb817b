//! `fs` storage: objects are files under a root directory, written atomically (a temporary file
//! in the same directory, then a rename), so a reader never sees half an image.
//!
//! Keys come from jobs, so a key is a relative path that never leaves the root: no `..`, and
//! no symbolic link is followed on the way (a link planted under the root cannot lead a read or
//! a write elsewhere). Files are created readable by their owner alone (0600, directories
//! 0700). Temporary files carry a `~` (a character no id, batch or record name has), so a
//! listing skips them and nothing else: ids that start with a dot are listed like any other.
//! Temporary files left by a crashed write are removed at start-up, once old enough not to be
//! another process's write in progress.

use std::io::ErrorKind;
use std::path::{Component, Path, PathBuf};
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use futures_util::future::BoxFuture;

use super::{
    ListPage, META_FINGERPRINT, ObjectInfo, ObjectStore, PutObject, StorageError, StorageErrorKind,
};

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

/// Temporary files start with this (a dot and a `~`): no key the worker writes does.
const TEMP_MARK: &str = ".~";

/// A temporary file this old is a crashed write's, not a write in progress.
const STALE_TEMP: Duration = Duration::from_secs(3600);

pub struct FsStore {
    root: PathBuf,
    location: String,
    /// Where the start-up check writes its probe (`storage.prefix`).
    prefix: String,
}

impl FsStore {
    pub fn new(root: &Path) -> std::io::Result<Self> {
        Self::with_prefix(root, "")
    }

    /// A store whose start-up check writes under `prefix` (`storage.prefix`), not beside it.
    pub fn with_prefix(root: &Path, prefix: &str) -> std::io::Result<Self> {
        create_dirs(root)?;
        let root = std::fs::canonicalize(root)?;
        Ok(Self {
            location: root.display().to_string(),
            root,
            prefix: prefix.to_string(),
        })
    }

    /// Refuses a path under the root that goes through a symbolic link (the root itself was
    /// resolved once, when the store was made).
    async fn no_links(&self, op: &'static str, key: &str, path: &Path) -> Result<(), StorageError> {
        let Ok(relative) = path.strip_prefix(&self.root) else {
            return Err(invalid(op, key, "the key leaves the root"));
        };
        let mut at = self.root.clone();
        for part in relative.components() {
            at.push(part);
            match tokio::fs::symlink_metadata(&at).await {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(invalid(
                        op,
                        key,
                        "the key goes through a symbolic link: not followed",
                    ));
                }
                Ok(_) => {}
                // What does not exist yet cannot be a link.
                Err(e) if e.kind() == ErrorKind::NotFound => return Ok(()),
                Err(e) => return Err(io_error(op, key, e)),
            }
        }
        Ok(())
    }

    /// The path of `key`, checked: relative, inside the root, through no link.
    async fn checked(&self, op: &'static str, key: &str) -> Result<PathBuf, StorageError> {
        let path = self.path(op, key)?;
        self.no_links(op, key, &path).await?;
        Ok(path)
    }

    /// Writes `data` to a new temporary file beside `path`, owner-only; returns its path.
    async fn write_temp(&self, path: &Path, data: &Bytes) -> std::io::Result<PathBuf> {
        let dir = path.parent().unwrap_or(&self.root).to_path_buf();
        let name = path
            .file_name()
            .and_then(|n| n.to_str())
            .unwrap_or("object")
            .to_string();
        let tmp = dir.join(format!("{TEMP_MARK}{name}.tmp-{:016x}", fastrand::u64(..)));
        let data = data.clone();
        let target = tmp.clone();
        let written = tokio::task::spawn_blocking(move || {
            create_dirs(&dir)?;
            let mut options = std::fs::OpenOptions::new();
            options.write(true).create_new(true);
            #[cfg(unix)]
            std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
            let mut file = options.open(&target)?;
            std::io::Write::write_all(&mut file, &data)
        })
        .await
        .map_err(std::io::Error::other)
        .and_then(|r| r);
        match written {
            Ok(()) => Ok(tmp),
            Err(e) => {
                let _ = tokio::fs::remove_file(&tmp).await;
                Err(e)
            }
        }
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
        let path = self.checked("put", object.key).await?;
        let err = |e: std::io::Error| io_error("put", object.key, e);
        // A directory keeps no metadata: the job fingerprint goes to a file of its own beside
        // the object, written first, so that an object never exists without it.
        if let Some((_, fingerprint)) = object.metadata.iter().find(|(k, _)| *k == META_FINGERPRINT)
        {
            let side = fingerprint_path(&path);
            let tmp = self
                .write_temp(&side, &Bytes::from(fingerprint.clone()))
                .await
                .map_err(err)?;
            tokio::fs::rename(&tmp, &side).await.map_err(err)?;
        }
        let tmp = self.write_temp(&path, &object.data).await.map_err(err)?;
        // A rename replaces a link at the final name rather than writing through it.
        if let Err(e) = tokio::fs::rename(&tmp, &path).await {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(err(e));
        }
        Ok(())
    }

    /// Removes the temporary files of writes that crashed, older than [`STALE_TEMP`].
    async fn remove_stale_temps(&self) {
        let root = self.root.clone();
        let removed = tokio::task::spawn_blocking(move || {
            let mut removed = 0u64;
            let mut pending = vec![root];
            let now = SystemTime::now();
            while let Some(dir) = pending.pop() {
                let Ok(entries) = std::fs::read_dir(&dir) else {
                    continue;
                };
                for entry in entries.flatten() {
                    let Ok(kind) = entry.file_type() else {
                        continue;
                    };
                    if kind.is_dir() {
                        pending.push(entry.path());
                    } else if kind.is_file()
                        && is_temp(&entry.file_name().to_string_lossy())
                        && entry
                            .metadata()
                            .and_then(|m| m.modified())
                            .is_ok_and(|at| now.duration_since(at).unwrap_or_default() > STALE_TEMP)
                        && std::fs::remove_file(entry.path()).is_ok()
                    {
                        removed += 1;
                    }
                }
            }
            removed
        })
        .await
        .unwrap_or(0);
        if removed > 0 {
            tracing::info!(removed, "removed temporary files of writes that crashed");
        }
    }
}

/// Whether a file is a write's temporary file (not a fingerprint kept beside an object).
fn is_temp(name: &str) -> bool {
    name.starts_with(TEMP_MARK) && name.contains(".tmp-")
}

/// Where the job fingerprint of the object at `path` is kept (a name listings skip).
fn fingerprint_path(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or("object");
    path.with_file_name(format!("{TEMP_MARK}fingerprint-{name}"))
}

/// Creates a directory and its parents, owner-only where they are new.
fn create_dirs(dir: &Path) -> std::io::Result<()> {
    let mut builder = std::fs::DirBuilder::new();
    builder.recursive(true);
    #[cfg(unix)]
    std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
    builder.create(dir)
}

fn invalid(op: &'static str, key: &str, message: &str) -> StorageError {
    StorageError {
        op,
        key: key.into(),
        kind: StorageErrorKind::Invalid,
        message: message.into(),
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
            let path = self.checked("put", object.key).await?;
            let err = |e: std::io::Error| io_error("put", object.key, e);
            // Written whole to a temporary file, then hard-linked into place: the link fails if
            // the name exists, so exactly one writer wins and no reader sees a partial file.
            let tmp = self.write_temp(&path, &object.data).await.map_err(err)?;
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
            let path = self.checked("delete", key).await?;
            let _ = tokio::fs::remove_file(fingerprint_path(&path)).await;
            match tokio::fs::remove_file(path).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(()),
                Err(e) => Err(io_error("delete", key, e)),
            }
        })
    }

    fn get<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<Bytes>, StorageError>> {
        Box::pin(async move {
            let path = self.checked("get", key).await?;
            match tokio::fs::read(&path).await {
                Ok(data) => Ok(Some(Bytes::from(data))),
                Err(e) if e.kind() == ErrorKind::NotFound => Ok(None),
                Err(e) => Err(io_error("get", key, e)),
            }
        })
    }

    fn head<'a>(&'a self, key: &'a str) -> BoxFuture<'a, Result<Option<ObjectInfo>, StorageError>> {
        Box::pin(async move {
            let path = self.checked("head", key).await?;
            match tokio::fs::metadata(&path).await {
                Ok(m) => Ok(Some(ObjectInfo {
                    size: m.len(),
                    content_type: None,
                    sha256: None,
                    fingerprint: tokio::fs::read_to_string(fingerprint_path(&path))
                        .await
                        .ok(),
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
            let start = self.checked("list", dir_key).await?;
            let mut pending = vec![(start, dir_key.to_string())];
            while let Some((dir, key)) = pending.pop() {
                let mut entries = match tokio::fs::read_dir(&dir).await {
                    Ok(entries) => entries,
                    Err(e) if e.kind() == ErrorKind::NotFound => continue,
                    Err(e) => return Err(io_error("list", prefix, e)),
                };
                while let Ok(Some(entry)) = entries.next_entry().await {
                    let name = entry.file_name().to_string_lossy().into_owned();
                    if name.starts_with(TEMP_MARK) {
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
            self.remove_stale_temps().await;
            // Under storage.prefix, where the worker writes, not beside it.
            let key = format!("{}{TEMP_MARK}imagegen-check", self.prefix);
            let probe = self.checked("check", &key).await?;
            let result = self.write_temp(&probe, &Bytes::from_static(b"ok")).await;
            if let Ok(tmp) = &result {
                let _ = tokio::fs::remove_file(tmp).await;
            }
            result.map(drop).map_err(|e| {
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

#[cfg(all(test, unix))]
mod hostile_tests;
#[cfg(test)]
mod listing_tests;
#[cfg(test)]
mod properties;
#[cfg(test)]
mod tests;
